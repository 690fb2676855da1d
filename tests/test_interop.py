"""import-checkpoint / export-checkpoint: s3prl and original-Mockingjay checkpoints, loaded safely.

The foreign checkpoints are built by hand here (BERT key names, s3prl's config sections), never
with s3prl code, and the reference network is written out below in plain torch, as s3prl's
upstream/mockingjay/model.py computes it: TF-style LayerNorm (eps 1e-12), post-LN, separate
query/key/value, -10000 added to the scores of padded keys, exact GELU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import pytest
import torch
import yaml

from mockingjay.checkpoint import CheckpointError, load_config, save_model_dir
from mockingjay.interop import (
    InteropError,
    convert_checkpoint,
    export_checkpoint,
    import_checkpoint,
)
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.safe_load import Unloaded, UnsafeCheckpointError
from stages.runtime import FEATURE_KEYS

from .conftest import PARAMS, TINY_PIPELINE, copy_repo, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRANSFORMER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    share_layer=False,
    pre_layer_norm=False,
)
# s3prl's tera logMel configs, plus eps (OnlinePreprocessor takes it) at our featurizer's 1e-6
AUDIO = {
    "target_level": -25,
    "win_ms": 25,
    "hop_ms": 10,
    "n_freq": 201,
    "n_mels": 80,
    "n_mfcc": 13,
    "eps": 1.0e-6,
    "input": {"feat_type": "mel", "channel": 0, "log": True, "delta": 0, "cmvn": True},
    "target": {"feat_type": "mel", "channel": 0, "log": True, "delta": 0, "cmvn": True},
}
TASK = {
    "loss": "L1",
    "sequence_length": 1500,
    "position_encoding_size": 32,
    "mask_proportion": 0.15,
    "mask_consecutive_min": 7,
    "mask_consecutive_max": 7,
    "mask_allow_overlap": True,
    "mask_bucket_ratio": 1.5,
    "mask_frequency": 0.2,
    "noise_proportion": 0.15,
}


def bert_weights(
    config: dict, in_features: int, out_features: int, legacy_names: bool = False, seed: int = 0
):
    """(encoder, head) state dicts in BERT names with random, non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    norm_names = ("gamma", "beta") if legacy_names else ("weight", "bias")

    def linear(prefix, rows, cols, into):
        into[f"{prefix}.weight"] = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
        into[f"{prefix}.bias"] = 0.1 * torch.randn(rows, generator=gen)

    def norm(prefix, into):
        into[f"{prefix}.{norm_names[0]}"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        into[f"{prefix}.{norm_names[1]}"] = 0.1 * torch.randn(hidden, generator=gen)

    encoder: dict = {}
    linear("input_representations.spec_transform", hidden, in_features, encoder)
    norm("input_representations.LayerNorm", encoder)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear(f"{p}attention.self.{name}", hidden, hidden, encoder)
        linear(f"{p}attention.output.dense", hidden, hidden, encoder)
        norm(f"{p}attention.output.LayerNorm", encoder)
        linear(f"{p}intermediate.dense", ffn, hidden, encoder)
        linear(f"{p}output.dense", hidden, ffn, encoder)
        norm(f"{p}output.LayerNorm", encoder)
    head: dict = {}
    linear("dense", hidden, hidden, head)
    norm("LayerNorm", head)
    linear("output", out_features, hidden, head)
    return encoder, head


def s3prl_checkpoint(input_dim=12, target_dim=12, transformer=None, audio=AUDIO, seed=0) -> dict:
    transformer = {**TRANSFORMER, "input_dim": -1, **(transformer or {})}
    encoder, head = bert_weights(transformer, input_dim, target_dim, seed=seed)
    upstream = {
        "transformer": transformer,
        "task": {**TASK, "position_encoding_size": transformer["hidden_size"]},
    }
    if audio is not None:
        upstream["audio"] = audio
    return {
        "Transformer": encoder,
        "SpecHead": head,
        "Upstream_Config": upstream,
        "Step": 1000,
        "Config": {"runner": {"total_steps": 1000}, "optimizer": {"name": "AdamW", "lr": 2e-4}},
        "Optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
        "Args": argparse.Namespace(config="config_runner.yaml", upstream="mockingjay", seed=1337),
    }


# -- the reference network, as s3prl computes it --------------------------------------------


def tf_layer_norm(x, state, prefix, eps=1e-12):
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    weight = state.get(f"{prefix}.weight", state.get(f"{prefix}.gamma"))
    bias = state.get(f"{prefix}.bias", state.get(f"{prefix}.beta"))
    return weight * (x - u) / torch.sqrt(s + eps) + bias


def dense(x, state, prefix):
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def reference_forward(encoder, head, frames, heads, rate=1):
    """All hidden states (input representation, then each layer) and the head's frames."""
    batch, length, dims = frames.shape
    steps = frames.view(batch, length // rate, dims * rate)  # s3prl's down_sample_frames
    step_lengths = (steps.sum(dim=-1) != 0).long().sum(dim=-1)  # s3prl: a step is real if non-zero
    real = (torch.arange(steps.size(1))[None] < step_lengths[:, None]).float()
    additive = (1.0 - real)[:, None, None, :] * -10000.0
    hidden = encoder["input_representations.spec_transform.weight"].size(0)
    angle = [
        [pos / 10000 ** (2 * (i // 2) / hidden) for i in range(hidden)]
        for pos in range(steps.size(1))
    ]
    positions = torch.tensor(angle, dtype=torch.float64)
    positions[:, 0::2], positions[:, 1::2] = positions[:, 0::2].sin(), positions[:, 1::2].cos()
    h = tf_layer_norm(
        dense(steps, encoder, "input_representations.spec_transform") + positions.float(),
        encoder,
        "input_representations.LayerNorm",
    )
    states = [h]
    head_dim = hidden // heads
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in encoder:
        p = f"encoder.layer.{layer}."

        def split(name):
            return (
                dense(h, encoder, p + f"attention.self.{name}")
                .view(batch, -1, heads, head_dim)
                .permute(0, 2, 1, 3)
            )

        scores = split("query") @ split("key").transpose(-1, -2) / math.sqrt(head_dim) + additive
        context = (
            (torch.softmax(scores, dim=-1) @ split("value"))
            .permute(0, 2, 1, 3)
            .reshape(batch, -1, hidden)
        )
        attended = tf_layer_norm(
            dense(context, encoder, p + "attention.output.dense") + h,
            encoder,
            p + "attention.output.LayerNorm",
        )
        inner = dense(attended, encoder, p + "intermediate.dense")
        inner = inner * 0.5 * (1.0 + torch.erf(inner / math.sqrt(2.0)))
        h = tf_layer_norm(
            dense(inner, encoder, p + "output.dense") + attended, encoder, p + "output.LayerNorm"
        )
        states.append(h)
        layer += 1
    x = dense(h, head, "dense")
    x = tf_layer_norm(x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), head, "LayerNorm")
    predicted = dense(x, head, "output").reshape(batch, length, -1)  # s3prl's up_sample_frames
    return states, step_lengths, predicted


def assert_matches_reference(model, encoder, head, frames, lengths, heads, rate=1):
    reference, step_lengths, predicted = reference_forward(encoder, head, frames, heads, rate)
    with torch.no_grad():
        ours = model.encoder(frames, lengths)
        ours_predicted = model(frames, lengths)
    assert torch.equal(ours.lengths, step_lengths)
    assert len(ours.hidden_states) == len(reference)
    for index, (mine, theirs) in enumerate(zip(ours.hidden_states, reference)):
        for b, steps in enumerate(step_lengths.tolist()):
            torch.testing.assert_close(
                mine[b, :steps],
                theirs[b, :steps],
                atol=1e-5,
                rtol=1e-5,
                msg=f"hidden state {index}, utterance {b}",
            )
    for b, frames_b in enumerate(lengths.tolist()):
        torch.testing.assert_close(
            ours_predicted[b, :frames_b], predicted[b, :frames_b], atol=1e-5, rtol=1e-5
        )


def padded_batch(lengths, dims, seed=1):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.zeros(len(lengths), max(lengths), dims)
    for b, n in enumerate(lengths):
        frames[b, :n] = torch.randn(n, dims, generator=gen)
    return frames, torch.tensor(lengths)


# -- tests ----------------------------------------------------------------------------------


def assert_s3prl_loader_accepts(checkpoint: dict, input_dim: int) -> None:
    """What s3prl/upstream/mockingjay/builder.py (TransformerBuilder, PretrainedTransformer[WithHead])
    and model.py (TransformerConfig) read from a checkpoint, and the keys TransformerModel loads."""
    assert (
        "transformer" not in checkpoint["Config"]
    )  # else builder.py takes Config as the upstream config
    config = checkpoint["Upstream_Config"]
    t = config["transformer"]
    for key, kind in (
        ("hidden_size", int),
        ("num_hidden_layers", int),
        ("num_attention_heads", int),
        ("hidden_act", str),
        ("intermediate_size", int),
        ("hidden_dropout_prob", float),
        ("attention_probs_dropout_prob", float),
        ("initializer_range", float),
        ("layer_norm_eps", float),
        ("share_layer", bool),
        ("pre_layer_norm", bool),
    ):
        assert isinstance(t[key], kind), key
    assert t["hidden_act"] in ("gelu", "relu", "swish") and t["input_dim"] == input_dim
    assert isinstance(config["task"]["sequence_length"], int)
    audio = config["audio"]
    assert "kaldi" not in audio and isinstance(audio["target_level"], (int, float))
    for name in ("input", "target"):  # select_feat(feat_type, channel, log, delta, cmvn)
        assert set(audio[name]) == {"feat_type", "channel", "log", "delta", "cmvn"}
    assert audio["n_mels"] * (1 + audio["input"]["delta"]) == input_dim
    layers = t["num_hidden_layers"]
    names = ["input_representations.spec_transform", "input_representations.LayerNorm"] + [
        f"encoder.layer.{i}.{m}"
        for i in range(layers)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
    ]
    assert set(checkpoint["Transformer"]) == {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    assert set(checkpoint["SpecHead"]) == {
        f"{n}.{p}" for n in ("dense", "LayerNorm", "output") for p in ("weight", "bias")
    }


@pytest.mark.parametrize(
    "layout, rate, activation", [("s3prl", 1, "gelu"), ("mockingjay", 3, "relu")]
)
def test_export_then_import_gives_identical_hidden_states(tmp_path, layout, rate, activation):
    config = ModelConfig(
        input_dim=80,
        target_dim=80,
        hidden_size=32,
        num_heads=4,
        intermediate_size=48,
        num_layers=2,
        downsample_rate=rate,
        activation=activation,
    )
    torch.manual_seed(0)
    model = MockingjayForMAM(config).eval()
    features = {
        "preset": "tera",
        "sample_rate": 16000,
        "n_mels": 80,
        "win_ms": 25.0,
        "hop_ms": 10.0,
        "n_fft": 400,
        "delta_order": 0,
        "delta_window": 5,
        "log_offset": 1e-6,
        "cmvn": "utterance",
        "target": "input",
    }
    checkpoint, _ = export_checkpoint(
        model, {"features": features, "training": {"total_steps": 7}}, layout
    )
    if layout == "s3prl":
        assert_s3prl_loader_accepts(checkpoint, input_dim=80)
    torch.save(checkpoint, tmp_path / "model.ckpt")
    assert torch.load(
        tmp_path / "model.ckpt", weights_only=True
    )  # plain values only: no allow-list needed
    imported = import_checkpoint(tmp_path / "model.ckpt")
    assert imported.model.config == config and imported.layout == layout
    assert {k: imported.sections["features"][k] for k in FEATURE_KEYS} == {
        k: features[k] for k in FEATURE_KEYS
    }
    frames, lengths = padded_batch([17, 9], 80)
    with torch.no_grad():
        before, after = model.encoder(frames, lengths), imported.model.encoder(frames, lengths)
        assert all(torch.equal(a, b) for a, b in zip(before.hidden_states, after.hidden_states))
        assert torch.equal(model(frames, lengths), imported.model(frames, lengths))


def test_s3prl_checkpoint_matches_a_direct_computation_with_the_same_weights(tmp_path):
    checkpoint = s3prl_checkpoint(input_dim=12, target_dim=12)
    torch.save(checkpoint, tmp_path / "states-1000.ckpt")
    imported = import_checkpoint(tmp_path / "states-1000.ckpt")
    config = imported.model.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size) == (
        32,
        2,
        4,
        48,
    )
    assert (config.input_dim, config.target_dim, config.downsample_rate, config.layer_norm_eps) == (
        12,
        12,
        1,
        1e-12,
    )
    frames, lengths = padded_batch([23, 11, 5], 12)
    assert_matches_reference(
        imported.model, checkpoint["Transformer"], checkpoint["SpecHead"], frames, lengths, heads=4
    )
    record = imported.sections["import"]
    assert record["unmapped"] == {
        "Upstream_Config.task.loss": "L1",
        "Upstream_Config.task.sequence_length": 1500,
        "Upstream_Config.task.mask_allow_overlap": True,
        "Upstream_Config.task.mask_bucket_ratio": 1.5,
        "Upstream_Config.audio.n_mfcc": 13,
        "Upstream_Config.audio.target_level": -25,
    }
    assert record["ignored"] == ["Args", "Config", "Optimizer"] and record["step"] == 1000
    assert (
        imported.sections["mask"]["span_length"] == 7
        and imported.sections["mask"]["noise_prob"] == 0.15
    )
    assert (
        imported.sections["features"]["n_mels"] == 80
        and imported.sections["features"]["log_offset"] == 1e-6
    )


def test_original_mockingjay_checkpoint_with_stacked_frames(tmp_path, monkeypatch):
    """Settings/Config/mockingjay, gamma/beta names, R=3, legacy (pre-zip) torch format, and an
    optimizer schedule object whose module (`optimizers`) is never imported."""
    model_section = {
        k: v for k, v in TRANSFORMER.items() if k not in ("share_layer", "pre_layer_norm")
    }
    model_section.update(downsample_rate=3, mask_proportion=0.15, mask_consecutive=3)
    encoder, head = bert_weights(model_section, 12 * 3, 10 * 3, legacy_names=True, seed=2)
    schedules = types.ModuleType("optimizers")

    class WarmupLinearSchedule:
        def __init__(self):
            self.warmup, self.t_total = 0.07, 500000

    WarmupLinearSchedule.__module__, WarmupLinearSchedule.__qualname__ = (
        "optimizers",
        "WarmupLinearSchedule",
    )
    schedules.WarmupLinearSchedule = WarmupLinearSchedule
    monkeypatch.setitem(sys.modules, "optimizers", schedules)
    checkpoint = {
        "Mockingjay": encoder,
        "SpecHead": head,
        "Global_step": 500000,
        "Optimizer": {
            "state": {},
            "param_groups": [{"lr": 4e-4, "schedule": WarmupLinearSchedule()}],
        },
        "Settings": {
            "Config": {"mockingjay": model_section, "solver": {"data_path": "data/libri_mel160"}},
            "Paras": argparse.Namespace(config="config/mockingjay_libri.yaml", seed=1337),
        },
    }
    torch.save(
        checkpoint, tmp_path / "mockingjay-500000.ckpt", _use_new_zipfile_serialization=False
    )
    monkeypatch.delitem(sys.modules, "optimizers")
    from mockingjay.safe_load import load_untrusted

    loaded = load_untrusted(tmp_path / "mockingjay-500000.ckpt")
    schedule = loaded["Optimizer"]["param_groups"][0]["schedule"]
    assert isinstance(schedule, Unloaded) and schedule.state == {"warmup": 0.07, "t_total": 500000}
    imported = convert_checkpoint(loaded, "mockingjay-500000.ckpt")
    config = imported.model.config
    assert (config.input_dim, config.target_dim, config.downsample_rate) == (12, 10, 3)
    frames, lengths = padded_batch([18, 10, 4], 12)  # 10 and 4 frames: partial last steps
    assert_matches_reference(imported.model, encoder, head, frames, lengths, heads=4, rate=3)
    assert imported.sections["mask"]["span_length"] == 3
    assert imported.sections["import"]["ignored"] == [
        "Optimizer",
        "Settings.Config.solver",
        "Settings.Paras",
    ]
    assert "features" not in imported.sections and any(
        "no feature settings" in n for n in imported.notes
    )


@pytest.mark.parametrize(
    "change, field",
    [
        ({"pre_layer_norm": True}, "Upstream_Config.transformer.pre_layer_norm"),
        ({"hidden_act": "tanh"}, "Upstream_Config.transformer.hidden_act"),
        ({"num_hidden_layers": 3}, "Upstream_Config.transformer.num_hidden_layers"),
        ({"downsample_rate": 5}, "Upstream_Config.transformer.downsample_rate"),
        # ModelConfig's own check, named as the imported config names the field
        ({"num_attention_heads": 3}, "Upstream_Config.transformer.num_attention_heads: 3 does"),
    ],
)
def test_unsupported_architectures_are_refused_naming_the_field(change, field):
    checkpoint = s3prl_checkpoint()
    checkpoint["Upstream_Config"]["transformer"].update(change)  # the weights stay as built
    with pytest.raises(InteropError, match=field.replace(".", r"\.")):
        convert_checkpoint(checkpoint, "x.ckpt")


def test_shared_layers_and_kaldi_features_are_imported_with_notes():
    checkpoint = s3prl_checkpoint(
        transformer={"share_layer": True, "max_input_length": 3000},
        audio={
            "kaldi": {
                "feat_type": "fbank",
                "fbank": {
                    "num_mel_bins": 4,
                    "frame_length": 25.0,
                    "frame_shift": 10.0,
                    "dither": 0.0,
                },
            },
            "delta": {"order": 2, "win_length": 5},
            "cmvn": {"use_cmvn": True},
        },
    )
    imported = convert_checkpoint(checkpoint, "x.ckpt")
    assert any("share_layer" in note for note in imported.notes)
    assert imported.unmapped["Upstream_Config.transformer.max_input_length"] == 3000
    assert imported.unmapped["Upstream_Config.audio.kaldi.fbank.dither"] == 0.0
    features = imported.sections["features"]
    assert (features["n_mels"], features["delta_order"], features["n_fft"], features["cmvn"]) == (
        4,
        2,
        512,
        "utterance",
    )
    assert any("Kaldi fbank" in d for d in imported.feature_differences)


def evil_checkpoint(path, marker, legacy=False):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save(
        {"Transformer": {}, "Args": Payload()}, path, _use_new_zipfile_serialization=not legacy
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_a_command_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "evil.ckpt", marker, legacy)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refused: its pickle needs the global (posix|nt)\.system"
    ):
        import_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_other_pickles_and_garbage_are_refused_cleanly(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"Transformer": Payload()}, protocol=4))
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 4)
    for name in ("raw.pkl", "noise.ckpt"):
        with pytest.raises(CheckpointError, match=f"{name}: (not a torch checkpoint|unreadable)"):
            import_checkpoint(tmp_path / name)
    assert not marker.exists()


@pytest.mark.slow  # the CLI end to end on a featurized repository
def test_import_probe_and_export_from_the_command_line(featurized_repo, tmp_path):
    """An s3prl checkpoint with 80-d log-mel settings, imported and probed on the fixture features."""
    repo = copy_repo(featurized_repo, tmp_path / "repo")
    (repo / "params.yaml").write_text(
        yaml.safe_dump({**PARAMS, "probe": {**TINY_PIPELINE["probe"], "tasks": ["phone"]}})
    )
    source = s3prl_checkpoint(input_dim=80, target_dim=80)
    torch.save(source, repo / "tera.ckpt")
    evil_checkpoint(repo / "evil.ckpt", tmp_path / "pwned")
    refused = run(["mockingjay", "import-checkpoint", "evil.ckpt", "models/evil"], repo)
    assert (
        refused.returncode == 1
        and "posix.system" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    assert not (tmp_path / "pwned").exists() and not (repo / "models/evil").exists()

    result = run(["mockingjay", "import-checkpoint", "tera.ckpt", "models/tera"], repo)
    assert result.returncode == 0, result.stderr
    assert (
        "Upstream_Config.task.loss = 'L1'" in result.stderr and "log_offset=1e-06" in result.stderr
    )
    stored = json.loads((repo / "models/tera/config.json").read_text())
    assert stored["features"]["n_mels"] == 80 and stored["import"]["layout"] == "s3prl"
    probe = run(["mockingjay", "probe", "--checkpoint", "models/tera", "--layer", "2"], repo)
    assert probe.returncode == 0, probe.stderr
    row = probe.stdout.splitlines()[2].split()  # the layer-2 row of the result table
    assert row[0] == "2" and 0 < float(row[1].rstrip("%")) <= 100, probe.stdout
    assert "target_level=-25" in probe.stderr  # the known feature difference is repeated at use

    # The same weights with s3prl's default eps (1e-10): the probe says what to re-featurize with.
    imported = convert_checkpoint(
        {
            **source,
            "Upstream_Config": {
                **source["Upstream_Config"],
                "audio": {k: v for k, v in AUDIO.items() if k != "eps"},
            },
        },
        "tera-eps.ckpt",
    )
    save_model_dir(
        repo / "models/tera-eps", imported.model, imported.model.config, extra=imported.sections
    )
    mismatch = run(["mockingjay", "probe", "--checkpoint", "models/tera-eps"], repo)
    assert mismatch.returncode == 1 and "Traceback" not in mismatch.stderr
    assert "log_offset: model 1e-10 vs features 1e-06" in mismatch.stderr

    exported = run(["mockingjay", "export-checkpoint", "models/tera", "exported.ckpt"], repo)
    assert exported.returncode == 0, exported.stderr
    back = torch.load(repo / "exported.ckpt", weights_only=True)
    assert set(back["Transformer"]) == set(source["Transformer"])
    assert all(torch.equal(back["Transformer"][k], v) for k, v in source["Transformer"].items())
    assert back["Upstream_Config"]["audio"] == {
        **AUDIO,
        "sample_rate": 16000,
        "win_ms": 25.0,
        "hop_ms": 10.0,
    }
    assert load_config(repo / "models/tera")["model"]["num_layers"] == 2
