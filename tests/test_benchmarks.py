"""Smoke runs of the issue-7 benchmark scripts: each runs in its smallest mode and prints the JSON
its documentation promises, with positive numbers. Speed is never asserted here.

The four scripts start together (each a subprocess, most with children of their own) and each
test waits for its own: the whole file takes about as long as the slowest script.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from .conftest import communicate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("benchmarks"),
]  # runs the benchmark scripts, on one worker

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FSDD = ROOT / "tests" / "fixtures" / "fsdd" / "recordings"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_manifest(path: Path, count: int = 6) -> Path:
    """A prepare-style manifest of a few FSDD fixtures (8 kHz: the featurize run resamples)."""
    fields = [
        "utt_id",
        "path",
        "corpus",
        "speaker",
        "duration",
        "num_samples",
        "sample_rate",
        "channels",
        "transcript",
        "align",
        "split",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(fields)
        for i, wav in enumerate(sorted(FSDD.glob("*.wav"))[:count]):
            info = sf.info(wav)
            samples = -(
                -info.frames * 16000 // info.samplerate
            )  # after prepare's resampling to 16 kHz
            writer.writerow(
                [
                    f"fsdd_{wav.stem}",
                    str(wav),
                    "fsdd",
                    wav.stem.split("_")[1],
                    f"{info.duration:.4f}",
                    samples,
                    info.samplerate,
                    info.channels,
                    "",
                    "0",
                    ("train", "dev", "test")[i % 3],
                ]
            )
    return path


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    manifest = tiny_manifest(tmp / "manifest.tsv")
    commands = {
        "pretrain": [
            "pretrain_throughput.py",
            "--device",
            "cpu",
            "--batch",
            "2",
            "--frames",
            "48",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--hidden-size",
            "64",
            "--real-loop",
            "--tmp",
            str(tmp),
        ],
        "extract": ["extract_throughput.py", "--quick", "--tmp", str(tmp)],
        "scaling": [
            "scaling.py",
            "--quick",
            "--sizes",
            "1,2",
            "--featurize-sizes",
            "1",
            "--seq-lens",
            "64",
            "--threads",
            "1",
            "--manifest",
            str(manifest),
            "--tmp",
            str(tmp),
        ],
        "ddp": ["ddp_scaling.py", "--quick", "--tmp", str(tmp)],
    }
    env = {**os.environ, **ONE_THREAD}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / args[0]), *args[1:]],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
        )
        for name, args in commands.items()
    }
    results = {}

    def result(name: str) -> dict:
        if name not in results:
            out, err = communicate(procs[name], name)
            assert procs[name].returncode == 0, f"{name} failed:\n{out[-2000:]}\n{err[-4000:]}"
            results[name] = json.loads(out)
        return results[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_pretrain_real_loop_reports_both_throughputs_and_their_ratio(runs):
    report = runs("pretrain")
    assert positive(report["audio_seconds_per_second"]) and report["device"] == "cpu"
    real = report["real_loop"]
    assert real["store"]["uniform_length"] and real["same_shapes_as_model_only"]
    for phase in ("trainer_step_device_batches", "trainer_real_loop"):
        assert real[phase]["steps_timed"] == 2
        assert all(
            positive(real[phase][k])
            for k in ("audio_seconds_per_second", "ms_per_step", "cpu_ms_per_step")
        )
    assert positive(real["loader_only"]["audio_seconds_per_second"])
    # the ratios are the reported figures' own quotients (rounding aside), not separate measurements
    assert real["ratio_real_loop_vs_model_only"] == pytest.approx(
        real["trainer_real_loop"]["audio_seconds_per_second"] / report["audio_seconds_per_second"],
        rel=0.02,
    )
    assert real["ratio_real_loop_vs_trainer_step"] == pytest.approx(
        real["trainer_real_loop"]["audio_seconds_per_second"]
        / real["trainer_step_device_batches"]["audio_seconds_per_second"],
        rel=0.02,
    )


def test_extract_reports_each_stage_of_the_path(runs):
    report = runs("extract")
    assert report["layers_emitted"] == [0, 1, 2, 3] and report["input_emitted"]
    for key in (
        "model_forward_device_batches",
        "encode_batches",
        "encode_batches_to_host",
        "host_batch_assembly",
        "extract_to_disk",
    ):
        assert positive(report[key]["audio_seconds_per_second"]), key
    assert (
        report["audio_seconds_per_second"] == report["encode_batches"]["audio_seconds_per_second"]
    )
    assert report["extract_to_disk"]["bytes_written"] > 0


def test_scaling_covers_corpus_size_sequence_length_and_memory(runs):
    report = runs("scaling")
    (featurize,) = report["featurize"]["sizes"]
    assert featurize["size"] == 1 and positive(featurize["audio_sec"])
    assert all(
        positive(featurize[k])
        for k in (
            "seconds",
            "real_time_factor",
            "cpu_sec",
            "peak_rss_main_mb",
            "peak_rss_worker_mb",
        )
    )
    pretrain = report["pretrain"]["sizes"]
    assert [row["size"] for row in pretrain] == [1, 2] and pretrain[1]["frames"] == 2 * pretrain[0][
        "frames"
    ]
    for row in pretrain:
        assert all(
            positive(row[k])
            for k in (
                "audio_seconds_per_second",
                "sec_per_1000_frames",
                "epoch_sec_projected",
                "peak_rss_mb",
                "rss_anon_mb",
            )
        )
    assert pretrain[1]["relative_to_smallest"]["frames"] == 2.0
    assert positive(report["pretrain"]["epoch_plan_at_librispeech_960"]["seconds"])
    (row,) = report["seqlen"]["lengths"]
    assert row["frames"] == 64 and row["batch"] == 4
    assert positive(row["ms_per_step"]) and positive(row["ms_per_1000_frames"])
    assert row["step_peak_mb"] is None or row["step_peak_mb"] >= 0


def test_ddp_scaling_runs_both_sides_with_one_thread_each(runs):
    report = runs("ddp")
    assert report["nproc"] == 2 and report["threads_per_process"] == 1
    (single,), (ddp,) = report["single"], report["ddp"]
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert single["torch_threads"] == ddp["torch_threads"] == 1
    assert ddp["audio_seconds_per_second_all_ranks"] == pytest.approx(
        2 * ddp["audio_seconds_per_second"], rel=0.01
    )
    for key in (
        "ratio",
        "ratio_cpu_time",
        "best_single_samples_per_second",
        "best_ddp_samples_per_second_per_process",
    ):
        assert positive(report[key]), key
