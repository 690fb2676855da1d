"""Long inputs (issue 13): a recording of hours was accepted silently, featurize took gigabytes and
extract sat on one attention batch for minutes. Here on real fixture audio, tiled into long files:
prepare's duration limit, featurize's block-wise computation, and windowed encoding (extract and
online probing)."""

from __future__ import annotations

import csv
import re
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from mockingjay.audio import STREAM_ABOVE_SEC, audio_blocks, checked_length, read_audio
from mockingjay.checkpoint import save_model_dir
from mockingjay.extract import ExtractError, check_window_frames, extract_representations, windows
from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.feature_config import FeatureConfig, feature_config, num_frames
from mockingjay.features import FeatureExtractor, featurize_wave, load_wave, stream_features
from mockingjay.featurize import write_features
from mockingjay.manifest import ManifestRow, write_tsv
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.probe_online import _FrameLabels, _Passes, _statistics_pass
from mockingjay.probe_utterance import utterance_stats

from .conftest import ARCTIC_DIR, FSDD_DIR, run

ARCTIC = sorted(ARCTIC_DIR.glob("*.wav"))
WINDOW = 256  # frames: the ARCTIC sentences (~300 frames) and the long file are windowed, the digits are not


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny tensors here: see conftest.one_torch_thread."""


def long_recording(path, files=ARCTIC, repeats: int = 1):
    """A long real recording: the fixture sentences one after the other (`repeats` times over)."""
    waves = [sf.read(f, dtype="float32")[0] for f in files] * repeats
    sf.write(path, np.concatenate(waves), 16_000)
    return path


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def real_store(tmp_path_factory):
    """Log-mel of real audio: 3 digits (short), 3 sentences (a little over WINDOW), and 6 sentences one
    after the other (~20 s, ~2100 frames: 11 windows), with random frame labels."""
    folder = tmp_path_factory.mktemp("long")
    extractor = FeatureExtractor(FeatureConfig())
    files = (
        sorted(FSDD_DIR.glob("[0-2]_theo_0.wav"))
        + ARCTIC[:3]
        + [long_recording(folder / "long.wav", ARCTIC[:6])]
    )
    rng = np.random.default_rng(0)
    with (
        RaggedWriter(folder / "train", 80, "float16", {"kind": "input"}) as writer,
        RaggedWriter(folder / "labels", 1, "int16", {}) as labels,
    ):
        for i, path in enumerate(files):
            feats, _ = featurize_wave(
                load_wave(str(path), extractor, sf.info(path).samplerate), extractor, np.float16
            )
            writer.append(f"utt{i}", feats)
            labels.append(f"utt{i}", rng.integers(-1, 40, (len(feats), 1)).astype(np.int16))
    return RaggedArray(folder / "train"), RaggedArray(folder / "labels")


def tiny_model(downsample_rate: int = 1) -> MockingjayForMAM:
    torch.manual_seed(0)
    return MockingjayForMAM(
        ModelConfig(
            input_dim=80,
            target_dim=80,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            downsample_rate=downsample_rate,
        )
    )


@pytest.mark.parametrize(
    "length,window,rate",
    [(5500, 256, 1), (5500, 256, 3), (257, 256, 1), (1000, 4000, 1), (4001, 4000, 3)],
)
def test_windows_tile_the_utterance_and_never_exceed_the_window(length, window, rate):
    plan = windows(length, window, rate)
    if length <= window:
        assert plan == [(0, length, 0, length)]
        return
    kept = [(k0, k1) for _, _, k0, k1 in plan]
    assert (
        kept[0][0] == 0
        and kept[-1][1] == length
        and all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
    )
    for s0, s1, k0, k1 in plan:
        assert s1 - s0 <= window and s0 <= k0 < k1 <= s1 and s0 % rate == 0 and k0 % rate == 0
        assert k0 - s0 == min(
            k0, window // 8 // rate * rate + (rate if window // 8 % rate else 0)
        )  # context before


def test_window_frames_is_checked_against_the_downsample_rate():
    check_window_frames(48, 3)
    for bad in (47, 0, True, 100.0):
        with pytest.raises(ExtractError, match="window_frames: must be an integer >= 48"):
            check_window_frames(bad, 3)


@pytest.mark.parametrize("downsample_rate", [1, 3])
def test_short_utterances_encode_as_before_and_long_ones_window_by_window(
    real_store, tmp_path, downsample_rate
):
    store, _ = real_store
    model = tiny_model(downsample_rate).eval()
    seen: list[int] = []
    model.encoder.input_representation.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].size(1))
    )
    whole = extract_representations(
        model, store, tmp_path / "whole", window_frames=None, progress=False
    )
    assert max(seen) == store.lengths.max()  # without windows the long file is one attention batch
    seen.clear()
    calls = []
    windowed = extract_representations(
        model,
        store,
        tmp_path / "windowed",
        window_frames=WINDOW,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert max(seen) <= WINDOW  # memory is bounded by the window, not the file
    long_item = int(np.argmax(store.lengths))
    plan = windows(int(store.lengths[long_item]), WINDOW, downsample_rate)
    assert len(calls) >= len(plan) and [d for d, _ in calls] == sorted(
        d for d, _ in calls
    )  # progress per window
    assert calls[-1] == (int(store.lengths.sum()), int(store.lengths.sum()))
    assert whole["stores"] == windowed["stores"] == ["input", "layer_00", "layer_01", "layer_02"]
    for name in whole["stores"]:
        a, b = RaggedArray(tmp_path / "whole" / name), RaggedArray(tmp_path / "windowed" / name)
        assert list(a.ids) == list(b.ids) and list(a.lengths) == list(b.lengths)
        for item in range(len(store)):
            if (
                store.lengths[item] <= WINDOW or name == "input"
            ):  # fits: byte for byte today's output
                assert np.asarray(a[item]).tobytes() == np.asarray(b[item]).tobytes(), (name, item)
    # a long utterance's kept frames are what the model gives on the window it sees
    rows = np.asarray(store[long_item], dtype=np.float32)
    stored = [
        np.asarray(RaggedArray(tmp_path / "windowed" / f"layer_{i:02d}")[long_item], np.float32)
        for i in range(3)
    ]
    for s0, s1, k0, k1 in plan[:2] + plan[-2:]:
        with torch.no_grad():
            states = model.encoder(
                torch.from_numpy(rows[s0:s1])[None], torch.tensor([s1 - s0])
            ).hidden_states
        for layer, state in enumerate(states):
            direct = (
                state[0].repeat_interleave(downsample_rate, 0)[: s1 - s0].half().float().numpy()
            )
            np.testing.assert_allclose(
                stored[layer][k0:k1], direct[k0 - s0 : k1 - s0], atol=2e-2, rtol=1e-2
            )


def test_online_probing_pools_and_labels_long_utterances_as_the_windowed_stores_hold_them(
    real_store, tmp_path
):
    store, labels = real_store
    model = tiny_model().eval()
    extract_representations(model, store, tmp_path / "reps", window_frames=WINDOW, progress=False)
    splits = {"train": store, "dev": store, "test": store}
    frame_labels = {split: _FrameLabels(store, labels, split, 40) for split in splits}
    passes = _Passes(model, splits, [0, 1, 2], torch.device("cpu"), True, 32_000, WINDOW)
    means, moments = _statistics_pass(
        passes, ["input", "layer_00", "layer_01", "layer_02"], frame_labels, True
    )
    labelled = np.flatnonzero(np.asarray(labels.data[:, 0]) >= 0)
    for name in ("input", "layer_00", "layer_01", "layer_02"):
        reps = RaggedArray(tmp_path / "reps" / name)
        # statistics pooling over the windows of an utterance = over its stored frames
        np.testing.assert_allclose(
            means["train"][name], utterance_stats(reps), atol=1e-5, rtol=1e-5
        )
        # the labelled frames each window keeps are the stored frames at those positions
        mean, std = moments[name].mean_std()
        frames = np.asarray(reps.data[labelled], dtype=np.float64)
        np.testing.assert_allclose(mean, frames.mean(0), atol=1e-5)
        np.testing.assert_allclose(std, frames.std(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "preset,cmvn,target",
    [("tera", "utterance", "input"), ("s3prl", "utterance", "input"), ("paper", "none", "linear")],
)
def test_block_wise_features_equal_the_one_shot_computation_on_a_real_file(
    tmp_path, preset, cmvn, target
):
    path = str(long_recording(tmp_path / "long.wav", ARCTIC[:4]))  # 14 s of real speech
    extractor = FeatureExtractor(
        FeatureConfig(**feature_config({"preset": preset, "cmvn": cmvn, "target": target}))
    )
    whole, whole_target = featurize_wave(load_wave(path, extractor, 16_000), extractor, np.float32)
    # 1.3 s blocks: many block edges, none on a frame boundary; deltas (s3prl: order 2) cross them
    blocks = list(stream_features(path, extractor, dtype=np.float32, block_sec=1.3))
    streamed = np.concatenate([f for f, _ in blocks if f is not None])
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(
        streamed, whole, atol=2e-5, rtol=0
    )  # float rounding (CMVN sums in another order)
    if target == "linear":
        np.testing.assert_allclose(
            np.concatenate([t for _, t in blocks if t is not None]), whole_target, atol=2e-5
        )


def test_block_wise_reading_resamples_as_the_whole_file_is(tmp_path):
    path = long_recording(tmp_path / "digits8k.wav", sorted(FSDD_DIR.glob("*_theo_*.wav")))
    sf.write(path, sf.read(path, dtype="float32")[0], 8_000)  # the digits are 8 kHz recordings
    whole = read_audio(path, 16_000).samples
    blocks = list(audio_blocks(path, 16_000, block_sec=0.37))
    assert len(blocks) > 10 and sum(map(len, blocks)) == len(whole)
    np.testing.assert_allclose(np.concatenate(blocks), whole, atol=1e-6, rtol=0)


def test_featurize_streams_only_files_over_the_threshold_and_keeps_every_other_byte(tmp_path):
    files = sorted(FSDD_DIR.glob("[0-2]_theo_0.wav")) + [
        long_recording(tmp_path / "long.wav", ARCTIC[:4])
    ]
    rows = []
    for i, path in enumerate(files):
        audio = read_audio(path, 16_000)
        rows.append(
            ManifestRow(
                f"utt{i}",
                str(path),
                "c",
                "s",
                round(audio.duration, 4),
                len(audio.samples),
                audio.source_sample_rate,
                1,
                "",
                False,
                split="train",
            )
        )
    config = FeatureConfig()
    outputs = {}
    for name, threshold in (("one-shot", 1e9), ("streamed", 10.0)):
        (tmp_path / name).mkdir()
        write_features(
            rows, config, tmp_path / name, workers=1, progress=False, stream_above_sec=threshold
        )
        outputs[name] = RaggedArray(tmp_path / name / "train")
    one_shot, streamed = outputs["one-shot"], outputs["streamed"]
    assert list(one_shot.ids) == list(streamed.ids) and list(one_shot.lengths) == list(
        streamed.lengths
    )
    for item in range(3):  # under the threshold: the same float16 bytes
        assert np.asarray(one_shot[item]).tobytes() == np.asarray(streamed[item]).tobytes()
    # over it: the same features up to float16 rounding of values that differ by float32 rounding
    np.testing.assert_allclose(
        np.asarray(streamed[3], np.float32),
        np.asarray(one_shot[3], np.float32),
        atol=4e-3,
        rtol=2e-3,
    )


def test_prepare_lists_a_file_over_max_duration_as_too_long_from_its_header(tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    for wav in ARCTIC[:2]:
        shutil.copy(wav, corpus / wav.name)
        shutil.copy(wav.with_suffix(".txt"), corpus / wav.with_suffix(".txt").name)
    long = long_recording(corpus / "aew_b0001.flac", ARCTIC, repeats=2)  # 53 s
    seconds = sf.info(long).duration
    (corpus / "aew_b0001.txt").write_text("a whole session that nobody cut\n")
    # cut short: FLAC's header still says 110 s, and decoding would say "truncated": it is never decoded
    long.write_bytes(long.read_bytes()[: long.stat().st_size // 2])
    params = {
        "prepare": {
            "on_error": "skip",
            "max_duration_s": 30,
            "workers": 1,
            "corpora": [{"name": "a", "format": "arctic", "path": "data/corpus"}],
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(["mockingjay", "prepare", "--out", "prepared"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"prepare: skipped {long.relative_to(tmp_path)}: too long: {seconds:.1f} s, over prepare.max_duration_s (30 s)"
        in result.stderr
    )
    with open(tmp_path / "prepared" / "skipped.tsv") as f:
        skipped = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["path"], r["reason"]) for r in skipped] == [
        (str(long.relative_to(tmp_path)), "too_long")
    ]
    assert "Kaldi segments" in skipped[0]["detail"]
    with open(tmp_path / "prepared" / "manifest.tsv") as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 2


def test_a_long_file_is_checked_block_by_block_with_the_same_length(tmp_path):
    path = long_recording(tmp_path / "long.wav", ARCTIC[:4])
    audio = read_audio(path, 8_000)
    assert checked_length(path, 8_000) == (len(audio.samples), 16_000, 1)


# A command's peak memory, measured from outside it: this runs `sys.argv[1:]` as its only child and, once
# it has exited, prints the child's peak resident set (ru_maxrss: every page it held, shared libraries
# and mapped files included) and the peak of its anonymous memory (RssAnon in /proc, sampled every 10 ms:
# the arrays it allocates, which is what a file held whole would show as).
PEAK_MEMORY = r"""
import re, resource, subprocess, sys, time
child, anon = subprocess.Popen(sys.argv[1:]), 0
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as status:
            anon = max(anon, int(re.search(r"RssAnon:\s+(\d+)", status.read()).group(1)))
    except (OSError, AttributeError):  # exiting
        pass
    time.sleep(0.01)
print(f"peak memory: rss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} anon {anon} KiB", file=sys.stderr)
sys.exit(child.returncode)
"""


def peak_memory(args: list[str], cwd) -> dict[str, int]:
    """Run a command to its end (conftest.run: it fails only if it stalls) on one torch thread and
    return its peak memory in KiB: {"rss": ..., "anon": ...}."""
    result = run(
        [sys.executable, "-c", PEAK_MEMORY, *args], cwd, env={"OMP_NUM_THREADS": "1"}
    )  # tiny tensors
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"peak memory: rss (\d+) anon (\d+) KiB", result.stderr)
    return {"rss": int(found.group(1)), "anon": int(found.group(2))}


@pytest.mark.slow
def test_featurize_and_extract_hold_as_much_memory_for_a_file_four_times_longer(tmp_path):
    """Issue 13: featurize peaked at 5.4 GB on a 3-hour file. Here the fixture sentences end to end
    make one 5.5-minute and one 22-minute recording, both over audio.STREAM_ABOVE_SEC (streamed, in
    60 s blocks); `mockingjay featurize` and then `mockingjay extract` (200-frame windows) run on each
    as subprocesses. The longer file's 16.3 extra minutes are 61 MiB as float32 samples, and the
    whole-file arrays (samples, spectrogram) several times that; each command's peak memory may
    grow by less than half the samples' size, i.e. by nothing that scales with the file."""
    one = np.concatenate([sf.read(f, dtype="float32")[0] for f in ARCTIC])  # 26 s of real speech
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "featurize": {"workers": 1},
                "extract": {"window_frames": 200, "batch_frames": 2000, "device": "cpu"},
            }
        )
    )
    save_model_dir(
        tmp_path / "model",
        tiny_model(),
        tiny_model().encoder.config,
        {"features": FeatureConfig().to_dict()},
    )
    peaks, samples = {}, {}
    (tmp_path / "audio").mkdir()
    for name, minutes in (("short", 5.5), ("long", 22.0)):
        wave = np.tile(one, int(np.ceil(minutes * 60 * 16_000 / len(one))))
        samples[name] = len(wave)
        assert len(wave) / 16_000 > STREAM_ABOVE_SEC
        audio = tmp_path / "audio" / f"{name}.wav"
        sf.write(audio, wave, 16_000)
        del wave
        write_tsv(
            tmp_path / f"{name}.tsv",
            [
                ManifestRow(
                    name,
                    str(audio),
                    "c",
                    "s",
                    samples[name] / 16_000,
                    samples[name],
                    16_000,
                    1,
                    "",
                    False,
                    split="train",
                )
            ],
            ManifestRow,
        )
        peaks[name, "featurize"] = peak_memory(
            [
                "mockingjay",
                "featurize",
                "--manifest",
                f"{name}.tsv",
                "--no-labels",
                "--out",
                f"{name}/features",
            ],
            tmp_path,
        )
        assert RaggedArray(tmp_path / name / "features" / "train").lengths.tolist() == [
            num_frames(samples[name], 160)
        ]
        peaks[name, "extract"] = peak_memory(
            [
                "mockingjay",
                "extract",
                "--model",
                "model",
                "--features",
                f"{name}/features",
                "--out",
                f"{name}/reps",
            ],
            tmp_path,
        )
    extra_kib = (
        (samples["long"] - samples["short"]) * 4 / 1024
    )  # the extra audio once, as float32 samples
    print(
        f"peak memory (KiB), {samples['short'] / 16_000:.0f} s vs {samples['long'] / 16_000:.0f} s: {peaks}"
    )
    for command in ("featurize", "extract"):
        for kind in ("rss", "anon"):
            growth = peaks["long", command][kind] - peaks["short", command][kind]
            assert growth < extra_kib / 2, (command, kind, peaks)
