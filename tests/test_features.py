"""Tests for mockingjay.features and the featurize stage's computation, on real recordings.

The reference everywhere is the direct torch computation: torchaudio's MelSpectrogram (power 2,
centred), log(mel + 1e-6), torchaudio.functional.compute_deltas, per-utterance CMVN.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from mockingjay.audio import read_audio
from mockingjay.config import ParamError, from_section
from mockingjay.featstore import RaggedArray
from mockingjay.feature_config import FEATURE_PRESETS, FeatureConfig, feature_config, num_frames
from mockingjay.features import (
    FeatureExtractor,
    GlobalCMVN,
    featurize_file,
    load_wave,
    utterance_cmvn,
)
from mockingjay.manifest import ManifestRow

from .conftest import ARCTIC_DIR, FSDD_DIR

ARCTIC = ARCTIC_DIR / "aew_a0001.wav"  # 16 kHz, 3.9 s
FSDD = FSDD_DIR / "0_jackson_0.wav"  # 8 kHz, resampled to 16 kHz


def config_for(preset: str = "tera", **overrides) -> FeatureConfig:
    return from_section(FeatureConfig, feature_config({"preset": preset, **overrides}), "featurize")


def reference_log_mel(path: Path, config: FeatureConfig) -> torch.Tensor:
    """[T, dim] without CMVN, computed directly with torchaudio."""
    wave = torch.from_numpy(read_audio(path, config.sample_rate).samples)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        center=True,
        power=2.0,
    )(wave)
    parts = [torch.log(mel + 1e-6)]
    for _ in range(config.delta_order):
        parts.append(
            torchaudio.functional.compute_deltas(parts[-1], win_length=config.delta_window)
        )
    return torch.cat(parts, dim=0).T


def reference_cmvn(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = feats.double()
    mean, std = f.mean(0), f.std(0, unbiased=False)
    return (f - mean) / (std + 1e-5), mean, std


def row_for(path: Path, utt_id: str, split: str) -> ManifestRow:
    audio = read_audio(path, 16_000)
    return ManifestRow(
        utt_id=utt_id,
        path=str(path),
        corpus="c",
        speaker="s",
        duration=audio.duration,
        num_samples=len(audio.samples),
        sample_rate=audio.source_sample_rate,
        channels=1,
        transcript="",
        align=False,
        split=split,
    )


# ------------------------------------------------------------------ values = direct torch computation


@pytest.mark.parametrize("path", [ARCTIC, FSDD], ids=["arctic16k", "fsdd8k"])
@pytest.mark.parametrize("preset", ["tera", "paper", "s3prl"])
def test_features_equal_direct_torchaudio_computation(path, preset):
    config = config_for(preset, cmvn="none")
    extractor = FeatureExtractor(config)
    ref = reference_log_mel(path, config)
    rate = sf.info(str(path)).samplerate
    for source_rate in (
        None,
        rate,
    ):  # decoded at 16 kHz by read_audio, or at the source rate + cached kernel
        feats, target = featurize_file(str(path), extractor, source_rate)
        assert target is None and feats.dtype == np.float32
        assert feats.shape == tuple(ref.shape)
        np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", [ARCTIC, FSDD], ids=["arctic16k", "fsdd8k"])
def test_utterance_cmvn_features_equal_reference(path):
    config = config_for("s3prl")  # 240-d: deltas normalised too
    feats, _ = featurize_file(str(path), FeatureExtractor(config), sf.info(str(path)).samplerate)
    ref, mean, std = reference_cmvn(reference_log_mel(path, config))
    # Compared in the un-normalised scale: near-constant dimensions (nothing above 4 kHz in an
    # upsampled 8 kHz file) magnify float32 rounding by 1 / std after normalisation.
    err = np.abs((feats - ref.numpy()) * (std.numpy() + 1e-5))
    assert err.max() < 3e-5
    assert np.abs(feats - ref.numpy()).mean() < 1e-5


def test_float16_output_is_the_rounded_float32_output():
    extractor = FeatureExtractor(config_for("tera"))
    f32, _ = featurize_file(str(ARCTIC), extractor, 16_000)
    f16, _ = featurize_file(str(ARCTIC), extractor, 16_000, dtype=np.float16)
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))


def test_cached_resampler_is_identical_to_functional_resample():
    config = config_for("tera")
    extractor = FeatureExtractor(config)
    raw = torch.from_numpy(read_audio(FSDD, 8_000).samples)
    expected = torchaudio.functional.resample(raw, 8_000, 16_000)
    assert torch.equal(extractor.resampler(8_000)(raw), expected)
    assert extractor.resampler(8_000) is extractor.resampler(8_000)
    # a wrong source-rate hint (a stale manifest) changes nothing: the file is decoded again
    assert torch.equal(
        load_wave(str(FSDD), extractor, source_rate=22_050), load_wave(str(FSDD), extractor)
    )
    assert torch.equal(
        load_wave(str(FSDD), extractor, 8_000), torch.from_numpy(read_audio(FSDD, 16_000).samples)
    )


@pytest.mark.parametrize("preset,n_fft", [("tera", 400), ("paper", 2048)])
def test_linear_target_dims_and_values(preset, n_fft):
    config = config_for(preset, target="linear", cmvn="none")
    assert config.target_dim == n_fft // 2 + 1
    wave = torch.from_numpy(read_audio(ARCTIC, 16_000).samples)
    feats, target = featurize_file(str(ARCTIC), FeatureExtractor(config))
    assert target.shape == (num_frames(len(wave), config.hop_length), n_fft // 2 + 1)
    assert feats.shape[0] == target.shape[0]
    magnitude = torchaudio.transforms.Spectrogram(
        n_fft=n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        center=True,
        power=1.0,
    )(wave)
    np.testing.assert_allclose(target, torch.log(magnitude + 1e-6).T.numpy(), rtol=1e-6, atol=1e-5)
    assert FeatureExtractor(config).linear_target(wave).shape == target.shape
    with pytest.raises(RuntimeError, match="target"):
        FeatureExtractor(config_for(preset)).linear_target(wave)


# ------------------------------------------------------------------ presets and frame counts


@pytest.mark.parametrize(
    "preset,dim,hop", [("tera", 80, 160), ("paper", 160, 200), ("s3prl", 240, 160)]
)
def test_presets_give_dims_and_frame_counts(preset, dim, hop):
    config = config_for(preset, cmvn="none")
    assert config.dim == dim and config.hop_length == hop
    extractor = FeatureExtractor(config)
    for path in (ARCTIC, FSDD):
        wave = load_wave(str(path), extractor)
        feats = extractor(wave)
        assert feats.shape == (num_frames(len(wave), hop), dim)


def test_frame_count_rule_and_12_5_ms_hop():
    assert num_frames(16_000, 160) == 101
    assert num_frames(159, 160) == 1 and num_frames(160, 160) == 2
    config = config_for("tera", hop_ms=12.5)
    assert config.hop_length == 200
    wave = torch.from_numpy(read_audio(ARCTIC, 16_000).samples)
    assert FeatureExtractor(config)(wave).shape == (num_frames(len(wave), 200), 80)
    assert num_frames(len(wave), 200) == 1 + len(wave) // 200


def test_feature_config_merges_preset_and_explicit_values():
    merged = feature_config({"preset": "paper", "hop_ms": None, "n_mels": 40})
    assert merged["hop_ms"] == FEATURE_PRESETS["paper"]["hop_ms"]  # null = the preset's value
    assert merged["n_mels"] == 40 and merged["n_fft"] == 2048


# ------------------------------------------------------------------ CMVN


def test_utterance_cmvn_gives_zero_mean_unit_variance():
    config = config_for("s3prl", cmvn="none")
    extractor = FeatureExtractor(config)
    raw = extractor(load_wave(str(ARCTIC), extractor))
    for feats in (utterance_cmvn(raw), torch.from_numpy(utterance_cmvn(raw.numpy()))):
        assert isinstance(feats, torch.Tensor) and feats.shape == raw.shape
        np.testing.assert_allclose(feats.mean(0).numpy(), 0.0, atol=1e-4)
        np.testing.assert_allclose(feats.std(0, unbiased=False).numpy(), 1.0, atol=1e-3)


def test_global_cmvn_matches_numpy_over_concatenated_frames():
    config = config_for("tera", cmvn="none")
    extractor = FeatureExtractor(config)
    feats = [
        featurize_file(str(p), extractor)[0] for p in (ARCTIC, FSDD, ARCTIC_DIR / "slt_a0009.wav")
    ]
    first, second = GlobalCMVN(config.dim), GlobalCMVN(config.dim)
    first.update(feats[0])
    for f in feats[1:]:
        second.update(f)
    first.merge(second)
    mean, std = first.stats()
    allframes = np.concatenate(feats).astype(np.float64)
    assert first.count == len(allframes)
    np.testing.assert_allclose(mean, allframes.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, allframes.std(0) + 1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="no training frames"):
        GlobalCMVN(3).stats()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"win_ms": 50.0, "n_fft": 512}, "n_fft"),  # an 800-sample window in a 512-point FFT
        ({"delta_order": 3}, "delta_order"),
        ({"hop_ms": 10.03}, "hop_ms"),  # 160.48 samples
        ({"hop_ms": -10}, "hop_ms"),
        ({"win_ms": 0.0}, "win_ms"),
        ({"delta_window": 4}, "delta_window"),
    ],
)
def test_validate_errors_name_the_field(overrides, field):
    config = FeatureConfig(**{**feature_config({"preset": "tera"}), **overrides})
    with pytest.raises(ValueError, match=rf"^{field}:"):
        config.validate()
    with pytest.raises(ParamError, match=rf"featurize\.{field}"):
        config_for("tera", **overrides)


def test_window_error_names_both_sides():
    with pytest.raises(ValueError) as err:
        FeatureConfig(win_ms=50.0, n_fft=512).validate()
    assert "800" in str(err.value) and "win_ms" in str(err.value)


# ------------------------------------------------------------------ the stage's computation


@pytest.fixture
def small_corpus() -> list[ManifestRow]:
    arctic = sorted(ARCTIC_DIR.glob("*.wav"))
    fsdd = sorted(FSDD_DIR.glob("[0-3]_*.wav"))[:12]
    rows = [
        row_for(p, f"a{i}", "train" if i < 5 else "dev" if i < 6 else "test")
        for i, p in enumerate(arctic)
    ]
    rows += [row_for(p, f"f{i:02d}", "train" if i < 8 else "test") for i, p in enumerate(fsdd)]
    return rows


def test_stage_global_cmvn_gives_zero_mean_unit_variance_train_features(small_corpus, tmp_path):
    from mockingjay.featurize import sort_rows, write_features

    config = config_for("tera", cmvn="global")
    rows = sort_rows(small_corpus)
    out = tmp_path / "features"
    out.mkdir()
    resolved, table = write_features(rows, config, out, workers=2, progress=False, chunk_sec=3.0)
    assert [t[0] for t in table] == [r.utt_id for r in rows]
    train = RaggedArray(out / "train").data.astype(np.float64)
    assert train.shape[0] == sum(num_frames(r.num_samples, 160) for r in rows if r.split == "train")
    np.testing.assert_allclose(train.mean(0), 0.0, atol=2e-3)
    np.testing.assert_allclose(train.std(0), 1.0, atol=2e-3)
    # the statistics are those of the direct computation over the training utterances
    extractor = FeatureExtractor(config_for("tera", cmvn="none"))
    direct = np.concatenate(
        [reference_log_mel(Path(r.path), config).numpy() for r in rows if r.split == "train"]
    )
    np.testing.assert_allclose(
        resolved["global_cmvn"]["mean"], direct.mean(0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(resolved["global_cmvn"]["std"], direct.std(0), rtol=1e-4, atol=1e-4)
    assert (
        json.loads((out / "feature_config.json").read_text())["global_cmvn"]
        == resolved["global_cmvn"]
    )
    # dev / test use the training statistics: their stored values are (direct - mean) / std
    dev = RaggedArray(out / "dev")
    row = next(r for r in rows if r.split == "dev")
    expected = (
        featurize_file(row.path, extractor)[0] - np.float32(resolved["global_cmvn"]["mean"])
    ) / np.float32(resolved["global_cmvn"]["std"])
    np.testing.assert_allclose(
        dev.get(row.utt_id).astype(np.float32), expected, atol=0.02, rtol=2e-3
    )


def test_stage_pool_output_equals_one_process_output(small_corpus, tmp_path):
    from mockingjay.featurize import sort_rows, write_features

    config = config_for("s3prl", target="linear")
    rows = sort_rows(small_corpus)
    stores = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        write_features(rows, config, out, workers=workers, progress=False, chunk_sec=2.0)
        stores[workers] = out
    for store in ("train", "dev", "test", "train_target", "labels/train"):
        one, two = RaggedArray(stores[1] / store), RaggedArray(stores[2] / store)
        assert one.ids == two.ids and len(one) > 0
        np.testing.assert_array_equal(np.asarray(one.data), np.asarray(two.data))
    train = RaggedArray(stores[2] / "train")
    assert train.dim == 240 and RaggedArray(stores[2] / "train_target").dim == 201
    # each stored utterance is the float16 of featurize_file's float32 output (utterance CMVN)
    extractor = FeatureExtractor(config)
    row = next(r for r in rows if r.split == "train" and r.sample_rate == 8_000)
    feats, target = featurize_file(row.path, extractor, row.sample_rate)
    np.testing.assert_array_equal(train.get(row.utt_id), feats.astype(np.float16))
    np.testing.assert_array_equal(
        RaggedArray(stores[2] / "train_target").get(row.utt_id), target.astype(np.float16)
    )


def test_stage_names_an_unreadable_file(small_corpus, tmp_path):
    from dataclasses import replace

    from mockingjay.featurize import FeaturizeError, sort_rows, write_features

    missing = str(tmp_path / "gone.wav")
    rows = sort_rows([*small_corpus[:3], replace(small_corpus[3], path=missing)])
    out = tmp_path / "features"
    out.mkdir()
    with pytest.raises(FeaturizeError, match="gone.wav"):
        write_features(rows, config_for("tera"), out, workers=2, progress=False)
