"""Time the featurize stage end to end and piece by piece; print one JSON object.

End to end = what `mockingjay featurize` does between reading the manifest and finishing its
output folder: decode, resample (8 kHz FSDD -> 16 kHz), log-mel (+ deltas), CMVN, float16
stores written in manifest order (mockingjay.featurize.write_features, the stage's own code). Each
end-to-end run is a fresh Python process (torch already imported, as in the CLI, whose timer
also starts after the imports), so its peak RSS is its own; the pool start-up is inside it.

    python benchmarks/featurize.py                  # bundled corpus (data/prepared/manifest.tsv)
    python benchmarks/featurize.py --repeat 8       # 8 synthetic copies: time scales, RSS stays flat
    python benchmarks/featurize.py --ablations      # also the alternatives that were measured
    python benchmarks/featurize.py --quick          # one run of each, for a smoke test

The feature settings come from params.yaml (`featurize` section; `--preset` overrides).
Runs the prepare stage first when the manifest is missing. The machine is shared on some
hosts: every timing is the best of `--runs` (the median is reported too), with the load average
before and after, and CPU seconds (main process and workers) next to wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT / "data" / "prepared" / "manifest.tsv"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

from mockingjay.config import from_section, load_params  # noqa: E402
from mockingjay.feature_config import FeatureConfig, feature_config  # noqa: E402
from mockingjay.features import FeatureExtractor, featurize_wave, load_wave  # noqa: E402
from mockingjay.manifest import ManifestRow, read_manifest  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument(
        "--preset", choices=["tera", "paper", "s3prl"], help="override params.yaml's preset"
    )
    p.add_argument(
        "--cmvn", choices=["utterance", "global", "none"], help="override params.yaml's cmvn"
    )
    p.add_argument("--target", choices=["input", "linear"], help="override params.yaml's target")
    p.add_argument(
        "--repeat", type=int, default=1, help="synthetic copies of the corpus (ids suffixed)"
    )
    p.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    p.add_argument(
        "--runs", type=int, default=5, help="end-to-end runs (best and median are reported)"
    )
    p.add_argument("--chunk-sec", type=float, default=None, help="audio seconds per worker task")
    p.add_argument("--no-breakdown", action="store_true", help="end to end only")
    p.add_argument(
        "--no-previous", action="store_true", help="skip the previous implementation's timing"
    )
    p.add_argument(
        "--ablations", action="store_true", help="also time the alternatives that were measured"
    )
    p.add_argument("--quick", action="store_true", help="one run of each measurement")
    p.add_argument(
        "--tmp", type=Path, default=None, help="where output folders go (default: system temp)"
    )
    p.add_argument("--e2e-child", choices=["current", "previous"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
    return args


# ----------------------------------------------------------------------------- setup


def load_config(args) -> FeatureConfig:
    section = dict(load_params(args.params).get("featurize") or {}) if args.params.is_file() else {}
    for key in ("preset", "cmvn", "target"):
        if getattr(args, key):
            section[key] = getattr(args, key)
    if args.preset:  # the preset's own values, not params.yaml's explicit ones
        for key in ("n_mels", "win_ms", "hop_ms", "n_fft", "delta_order"):
            section.pop(key, None)
    section["workers"] = args.workers
    return from_section(FeatureConfig, feature_config(section), "featurize")


def load_rows(args) -> list[ManifestRow]:
    from mockingjay.featurize import sort_rows

    if not args.manifest.is_file() and args.manifest == DEFAULT_MANIFEST:
        print(f"{args.manifest} missing: running `mockingjay prepare`", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from stages.cli import app; app()",
                "prepare",
                "--params",
                str(args.params),
            ],
            check=True,
            cwd=ROOT,
        )
    rows = sort_rows(read_manifest(args.manifest))
    if args.repeat > 1:
        rows = [replace(r, utt_id=f"{r.utt_id}_x{k}") for k in range(args.repeat) for r in rows]
        rows = sort_rows(rows)
    return rows


def timed(fn, runs: int) -> dict:
    """Best and median wall-clock seconds, and CPU seconds of this process for the best run."""
    walls, cpus = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    best = int(np.argmin(walls))
    return {
        "best_sec": round(walls[best], 4),
        "median_sec": round(statistics.median(walls), 4),
        "cpu_sec": round(cpus[best], 4),
    }


def with_rtf(result: dict, audio_sec: float) -> dict:
    result["rtf_best"] = round(audio_sec / max(result["best_sec"], 1e-9), 1)
    result["rtf_median"] = round(audio_sec / max(result["median_sec"], 1e-9), 1)
    return result


# ----------------------------------------------------------------------------- end to end (child)


def previous_write(rows, config: FeatureConfig, out: Path, workers: int) -> None:
    """The stage as it was before this benchmark: ProcessPoolExecutor.map (default start method,
    chunksize 8, every task submitted at once) over read_audio (sinc kernel rebuilt per call),
    MelSpectrogram (|z|.pow(2)) and torch CMVN, float32 arrays back to the main process, which
    converts them to float16 and writes them (and empty label stores)."""
    from concurrent.futures import ProcessPoolExecutor

    from mockingjay.featstore import RaggedWriter
    from mockingjay.store_layout import SPLITS, labels_store

    paths = [r.path for r in rows]
    writers = {s: RaggedWriter(out / s, config.dim, "float16", {}) for s in SPLITS}
    labels = {s: RaggedWriter(labels_store(out, s), 1, "int16", {}) for s in SPLITS}
    with ProcessPoolExecutor(workers, initializer=_previous_init, initargs=(config,)) as pool:
        for row, feats in zip(rows, pool.map(_previous_featurize, paths, chunksize=8)):
            writers[row.split].append(row.utt_id, feats)
            labels[row.split].append(row.utt_id, np.full(feats.shape[0], -1, dtype=np.int16))
    for w in (*writers.values(), *labels.values()):
        w.close()


_previous_state: dict = {}


def _previous_init(config: FeatureConfig) -> None:
    torch.set_num_threads(1)
    _previous_state["config"] = config
    _previous_state["mel"] = reference_mel(config)


def _previous_featurize(path: str) -> np.ndarray:
    return reference_features(path, _previous_state["config"], _previous_state["mel"]).numpy()


def e2e_child(args) -> None:
    """One end-to-end run in this (fresh) process; prints a JSON line."""
    config = load_config(args)
    rows = load_rows(args)
    workers = config.workers or len(os.sched_getaffinity(0))
    out = args.out
    out.mkdir(parents=True)
    c0, t0 = time.process_time(), time.perf_counter()
    if args.e2e_child == "current":
        from mockingjay.featurize import CHUNK_AUDIO_SEC, write_features

        write_features(
            rows, config, out, workers, progress=False, chunk_sec=args.chunk_sec or CHUNK_AUDIO_SEC
        )
    else:
        previous_write(rows, config, out, workers)
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "sec": wall,
                "main_cpu_sec": main_cpu,
                "worker_cpu_sec": children.ru_utime + children.ru_stime,
                "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_rss_worker_mb": children.ru_maxrss / 1024,
                "workers": workers,
            }
        )
    )


def end_to_end(args, impl: str, runs: int, audio_sec: float, keep: Path | None = None) -> dict:
    results = []
    for i in range(runs):
        out = Path(tempfile.mkdtemp(prefix="featurize-bench-", dir=args.tmp)) / "features"
        cmd = [
            sys.executable,
            __file__,
            "--e2e-child",
            impl,
            "--out",
            str(out),
            "--manifest",
            str(args.manifest),
            "--params",
            str(args.params),
            "--repeat",
            str(args.repeat),
            "--workers",
            str(args.workers),
        ]
        for key in ("preset", "cmvn", "target", "chunk_sec"):
            if getattr(args, key):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"end-to-end run failed ({' '.join(cmd)}):\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if keep is not None and i == runs - 1:
                shutil.rmtree(keep, ignore_errors=True)
                shutil.move(str(out), keep)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    secs = [r["sec"] for r in results]
    best = results[int(np.argmin(secs))]
    summary = {
        "workers": best["workers"],
        "runs_sec": [round(s, 3) for s in secs],
        "best_sec": round(best["sec"], 4),
        "median_sec": round(statistics.median(secs), 4),
        "main_cpu_sec": round(best["main_cpu_sec"], 3),
        "worker_cpu_sec": round(best["worker_cpu_sec"], 3),
        "peak_rss_main_mb": round(max(r["peak_rss_main_mb"] for r in results), 1),
        "peak_rss_worker_mb": round(max(r["peak_rss_worker_mb"] for r in results), 1),
    }
    return with_rtf(summary, audio_sec)


# ----------------------------------------------------------------------------- reference


def reference_mel(config: FeatureConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        center=True,
        power=2.0,
    )


@torch.inference_mode()
def reference_features(
    path: str, config: FeatureConfig, mel: torch.nn.Module, cmvn: bool = True
) -> torch.Tensor:
    """The direct torch computation: MelSpectrogram, log, compute_deltas, utterance CMVN."""
    from mockingjay.audio import read_audio

    wave = torch.from_numpy(read_audio(path, config.sample_rate).samples)
    parts = [torch.log(mel(wave) + config.log_offset)]
    for _ in range(config.delta_order):
        parts.append(
            torchaudio.functional.compute_deltas(parts[-1], win_length=config.delta_window)
        )
    feats = torch.cat(parts, dim=0).T.contiguous()
    if cmvn and config.cmvn == "utterance":
        mean = feats.mean(dim=0, keepdim=True)
        std = feats.std(dim=0, unbiased=False, keepdim=True)
        feats = (feats - mean) / (std + 1e-5)
    return feats


def check_against_reference(store_dir: Path, rows, config: FeatureConfig) -> dict:
    """How far the stored float16 features are from the direct torch computation (float32)."""
    from mockingjay.featstore import RaggedArray
    from mockingjay.store_layout import feature_config_file

    stores = {s: RaggedArray(store_dir / s) for s in ("train", "dev", "test")}
    resolved = json.loads(feature_config_file(store_dir).read_text())
    mel = reference_mel(config)
    worst, exact, values = 0.0, 0, 0
    for row in rows:
        ref = reference_features(row.path, config, mel).numpy()
        if config.cmvn == "global":
            ref = (ref - np.asarray(resolved["global_cmvn"]["mean"], np.float32)) / np.asarray(
                resolved["global_cmvn"]["std"], np.float32
            )
        got = stores[row.split].get(row.utt_id)
        worst = max(worst, float(np.abs(got.astype(np.float32) - ref).max()))
        exact += int((got == ref.astype(np.float16)).sum())
        values += got.size
    return {
        "utterances_checked": len(rows),
        "max_abs_diff": worst,
        "fraction_equal_to_float16_of_reference": round(exact / max(values, 1), 6),
    }


# ----------------------------------------------------------------------------- breakdown


def breakdown(rows, config: FeatureConfig, runs: int, audio_sec: float) -> dict:
    """Single-process pieces (one torch thread, as in a worker), on the given rows."""
    from mockingjay.audio import read_audio
    from mockingjay.featurize import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as in a worker
    ex = FeatureExtractor(config)
    resampled = [r for r in rows if r.sample_rate != config.sample_rate]
    resampled_sec = sum(r.duration for r in resampled)
    out: dict = {}
    out["decode"] = with_rtf(
        timed(lambda: [read_audio(r.path, r.sample_rate) for r in rows], runs), audio_sec
    )
    raw = [torch.from_numpy(read_audio(r.path, r.sample_rate).samples) for r in resampled]
    out["resample_cached_kernel"] = with_rtf(
        timed(lambda: [ex.resampler(r.sample_rate)(w) for r, w in zip(resampled, raw)], runs),
        resampled_sec,
    )
    out["resample_cached_kernel"]["audio_sec"] = round(resampled_sec, 1)
    waves = [load_wave(r.path, ex, r.sample_rate) for r in rows]
    out["features"] = with_rtf(
        timed(lambda: [ex.features_and_target(w) for w in waves], runs), audio_sec
    )
    feats = [ex.features_and_target(w)[0].numpy() for w in waves]
    from mockingjay.features import utterance_cmvn

    out["cmvn_and_float16"] = with_rtf(
        timed(lambda: [torch.from_numpy(utterance_cmvn(f)).half() for f in feats], runs), audio_sec
    )
    out["featurize_file_one_process"] = with_rtf(
        timed(
            lambda: [
                featurize_wave(load_wave(r.path, ex, r.sample_rate), ex, np.float16) for r in rows
            ],
            runs,
        ),
        audio_sec,
    )
    out["pool_startup_sec"] = pool_startup(config, runs)
    return out


def _noop(_):
    return os.getpid()


def pool_startup(config: FeatureConfig, runs: int, method: str = "fork") -> float:
    """Seconds from creating the worker pool to every worker having answered once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mockingjay.featurize import init_worker

    workers = len(os.sched_getaffinity(0))
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=init_worker, initargs=(config,)
        ) as pool:
            list(pool.map(_noop, range(workers)))
            best = min(best, time.perf_counter() - t0)
    return round(best, 4)


# ----------------------------------------------------------------------------- ablations


def ablations(rows, config: FeatureConfig, runs: int, audio_sec: float, args) -> dict:
    """The alternatives that were measured against what the stage does now (single process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mockingjay.audio import read_audio
    from mockingjay.features import utterance_cmvn

    torch.set_num_threads(1)
    ex = FeatureExtractor(config)
    res: dict = {}
    waves = [load_wave(r.path, ex, r.sample_rate) for r in rows]
    mel = reference_mel(config)

    def via_module():
        with torch.inference_mode():
            for w in waves:
                torch.log(mel(w) + config.log_offset).T.contiguous()

    res["logmel_MelSpectrogram_abs_pow"] = with_rtf(timed(via_module, runs), audio_sec)
    res["logmel_stft_re2_im2_inference_mode"] = with_rtf(
        timed(lambda: [ex(w) for w in waves], runs), audio_sec
    )

    def no_mode():
        with torch.no_grad():
            for w in waves:
                ex._with_deltas(ex._log_mel(ex._power(w)))

    res["logmel_stft_re2_im2_no_grad"] = with_rtf(timed(no_mode, runs), audio_sec)
    res["logmel_batched_16_utterances_one_rfft"] = with_rtf(
        timed(lambda: batched_logmel(waves, ex, 16), runs), audio_sec
    )
    torch.set_num_threads(2)
    res["logmel_two_torch_threads"] = with_rtf(
        timed(lambda: [ex(w) for w in waves], runs), audio_sec
    )
    torch.set_num_threads(1)

    resampled = [r for r in rows if r.sample_rate != config.sample_rate]
    rs_sec = sum(r.duration for r in resampled)
    raw = [torch.from_numpy(read_audio(r.path, r.sample_rate).samples) for r in resampled]
    res["resample_functional_kernel_per_call"] = with_rtf(
        timed(
            lambda: [
                torchaudio.functional.resample(w, r.sample_rate, config.sample_rate)
                for r, w in zip(resampled, raw)
            ],
            runs,
        ),
        rs_sec,
    )
    res["resample_cached_kernel"] = with_rtf(
        timed(lambda: [ex.resampler(r.sample_rate)(w) for r, w in zip(resampled, raw)], runs),
        rs_sec,
    )
    same = all(
        torch.equal(
            torchaudio.functional.resample(w, r.sample_rate, config.sample_rate),
            ex.resampler(r.sample_rate)(w),
        )
        for r, w in zip(resampled[:20], raw[:20])
    )
    res["resample_cached_kernel"]["identical_to_functional"] = same

    feats = [ex(w) for w in waves]

    def torch_cmvn():
        for f in feats:
            (f - f.mean(0, keepdim=True)) / (f.std(0, unbiased=False, keepdim=True) + 1e-5)

    res["cmvn_torch"] = with_rtf(timed(torch_cmvn, runs), audio_sec)
    arrays = [f.numpy() for f in feats]
    res["cmvn_numpy"] = with_rtf(
        timed(lambda: [utterance_cmvn(a) for a in arrays], runs), audio_sec
    )
    res["float16_numpy_astype"] = with_rtf(
        timed(lambda: [a.astype(np.float16) for a in arrays], runs), audio_sec
    )
    res["float16_torch_half"] = with_rtf(
        timed(lambda: [torch.from_numpy(a).half().numpy() for a in arrays], runs), audio_sec
    )

    # pooled compute and transfer only (no writing): chunk sizes and the dtype sent back
    from mockingjay.featurize import chunks, init_worker

    workers = len(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("fork")
    pooled: dict = {}
    variants = [(c, d) for c in (2.5, 5.0, 15.0, 30.0, 60.0) for d in ("float16", "float32")]
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(config,)
    ) as pool:
        list(pool.map(_noop, range(workers)))
        for _ in range(runs):  # interleaved, so a change in the machine's load hits every variant
            for chunk_sec, dtype in variants:
                tasks = [
                    [(r.path, r.sample_rate, dtype) for r in c] for c in chunks(rows, chunk_sec)
                ]
                t0 = time.perf_counter()
                for result in pool.map(_ablation_chunk, tasks):
                    for a in result:
                        np.asarray(a).sum()  # touch it, as the writer would
                rtf = audio_sec / (time.perf_counter() - t0)
                key = f"chunk_{chunk_sec:g}s_{dtype}"
                pooled[key] = round(max(pooled.get(key, 0.0), rtf), 1)
    res["pooled_compute_only_rtf_best"] = pooled
    res["pool_startup_sec"] = {
        m: pool_startup(config, 1 if m != "fork" else runs, m)
        for m in ("fork", "forkserver", "spawn")
    }
    return res


def _ablation_chunk(tasks):
    from mockingjay.featurize import worker_extractor

    extractor = worker_extractor()
    out = []
    for path, rate, dtype in tasks:
        feats, _ = featurize_wave(load_wave(path, extractor, rate), extractor, np.dtype(dtype))
        out.append(feats)
    return out


@torch.inference_mode()
def batched_logmel(waves, ex: FeatureExtractor, group: int) -> list[torch.Tensor]:
    """Log-mel of `group` utterances at once: each reflect-padded (its own centre padding) and
    framed, all frames through one rfft and one matmul, then split again."""
    config = ex.config
    n_fft, hop = config.n_fft, config.hop_length
    window = torch.nn.functional.pad(
        ex.mel.spectrogram.window, ((n_fft - config.win_length) // 2,) * 2
    )
    fb = ex.mel.mel_scale.fb
    outputs = []
    for start in range(0, len(waves), group):
        frames = [
            torch.nn.functional.pad(w[None, None], (n_fft // 2, n_fft // 2), mode="reflect")[
                0, 0
            ].unfold(0, n_fft, hop)
            for w in waves[start : start + group]
        ]
        spec = torch.fft.rfft(torch.cat(frames) * window)
        power = spec.real.square() + spec.imag.square()
        logmel = torch.log_(torch.matmul(power, fb).add_(config.log_offset))
        outputs.extend(logmel.split([f.shape[0] for f in frames]))
    return outputs


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    for key in (
        "manifest",
        "params",
        "tmp",
        "out",
    ):  # the manifest's audio paths are relative to the repo
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())
    os.chdir(ROOT)
    if args.e2e_child:
        e2e_child(args)
        return
    config = load_config(args)
    rows = load_rows(args)
    base_rows = [r for r in rows if not args.repeat > 1 or r.utt_id.endswith("_x0")]
    audio_sec = sum(r.duration for r in rows)
    base_sec = sum(r.duration for r in base_rows)
    report: dict = {
        "corpus": {
            "manifest": str(args.manifest),
            "utterances": len(rows),
            "audio_sec": round(audio_sec, 1),
            "repeat": args.repeat,
            "resampled_utterances": sum(1 for r in rows if r.sample_rate != config.sample_rate),
        },
        "config": {
            k: getattr(config, k)
            for k in ("preset", "n_mels", "n_fft", "hop_ms", "delta_order", "cmvn", "target")
        },
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "loadavg_before": os.getloadavg(),
        },
    }
    keep = Path(tempfile.mkdtemp(prefix="featurize-bench-kept-", dir=args.tmp)) / "features"
    try:
        report["end_to_end"] = end_to_end(args, "current", args.runs, audio_sec, keep=keep)
        if not args.no_previous:
            report["previous_implementation_end_to_end"] = end_to_end(
                args, "previous", min(args.runs, 3), audio_sec
            )
        report["correctness_vs_direct_torch"] = check_against_reference(keep, base_rows, config)
    finally:
        shutil.rmtree(keep.parent, ignore_errors=True)
    if not args.no_breakdown:
        report["breakdown_one_process_base_corpus"] = breakdown(
            base_rows, config, min(args.runs, 3), base_sec
        )
    if args.ablations:
        report["ablations_base_corpus"] = ablations(
            base_rows, config, min(args.runs, 3), base_sec, args
        )
    report["machine"]["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
