"""Probe kinds and selections on planted signals: weighted sum finds the informative layer, the MLP
solves what a linear head cannot, label fractions are nested, speaker-independent tests exclude
heard speakers, keywords are classified per utterance."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.probe import probe_phones
from mockingjay.probe_heads import MLPSettings, ProbeConfig
from mockingjay.probe_plan import Utterance, fraction_members, select_utterances
from mockingjay.probe_stores import open_representations
from mockingjay.probe_utterance import probe_labels

SPLIT_SIZES = {"train": 60, "dev": 15, "test": 20}
DIM = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny tensors: see conftest.one_torch_thread."""


def write_stores(root: Path, make_frames, seed: int = 0) -> dict[str, RaggedArray]:
    """layer_00/01/02 stores and frame labels; make_frames(rng, n) -> (labels, {layer: rows})."""
    rng = np.random.default_rng(seed)
    for split, count in SPLIT_SIZES.items():
        writers = {
            n: RaggedWriter(root / "reps" / split / n, DIM)
            for n in ("layer_00", "layer_01", "layer_02")
        }
        with RaggedWriter(root / "labels" / split, 1, "int16") as labels_out:
            for i in range(count):
                labels, layers = make_frames(rng, int(rng.integers(20, 40)))
                for name, rows in layers.items():
                    writers[name].append(f"{split}_{i:03d}", rows)
                labels_out.append(f"{split}_{i:03d}", labels.astype(np.int16))
        for writer in writers.values():
            writer.close()
    return {split: RaggedArray(root / "labels" / split) for split in SPLIT_SIZES}


def planted_in_layer_01(rng, n):
    labels = rng.integers(0, 4, n)
    means = np.eye(4, DIM) * 3
    return labels, {
        "layer_00": rng.normal(0, 1, (n, DIM)),
        "layer_01": means[labels] + rng.normal(0, 0.5, (n, DIM)),
        "layer_02": rng.normal(0, 1, (n, DIM)),
    }


def xor_in_every_layer(rng, n):
    x = rng.normal(0, 1, (n, DIM))
    labels = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)
    return labels, {name: x for name in ("layer_00", "layer_01", "layer_02")}


def test_weighted_sum_puts_its_weight_on_the_informative_layer(tmp_path):
    labels = write_stores(tmp_path, planted_in_layer_01)
    # the layer weights move by at most ~lr a step: enough steps (here ~250) to concentrate them
    config = ProbeConfig(epochs=30, batch_size=256, learning_rates=(2e-2,), weight_decays=(0.0,))
    result = probe_phones(
        open_representations(tmp_path / "reps", include_input=False),
        labels,
        config,
        [f"c{i}" for i in range(4)],
        progress=False,
        kinds=("linear", "weighted_sum"),
    )
    weighted = next(p for p in result["probes"] if p["kind"] == "weighted_sum")
    weights = weighted["layer_weights"]
    assert max(weights, key=weights.get) == "layer_01" and weights["layer_01"] > 0.5
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    best_single = max(layer["accuracy"] for layer in result["layers"].values())
    assert weighted["accuracy"] >= best_single - 0.02 and weighted["accuracy"] > 0.9
    assert result["layers"]["layer_00"]["accuracy"] < 0.4  # noise: near chance (4 classes)


def test_mlp_solves_xor_that_a_linear_head_cannot(tmp_path):
    labels = write_stores(tmp_path, xor_in_every_layer)
    config = ProbeConfig(epochs=15, batch_size=128, learning_rates=(1e-2,), weight_decays=(0.0,))
    reps = open_representations(tmp_path / "reps", layers=[1], include_input=False)
    result = probe_phones(
        reps,
        labels,
        config,
        ["a", "b"],
        progress=False,
        kinds=("linear", "mlp"),
        mlp=MLPSettings(hidden_size=32, dropout=0.0, learning_rate=1e-2),
    )
    mlp = next(p for p in result["probes"] if p["kind"] == "mlp")
    assert result["layers"]["layer_01"]["accuracy"] < 0.62  # XOR is not linearly separable
    assert mlp["accuracy"] > 0.9 and mlp["layer"] == "layer_01"


def test_label_fractions_are_nested_deterministic_and_reported(tmp_path):
    ids = [f"utt{i:04d}" for i in range(1000)]
    members = fraction_members(ids, (0.01, 0.1, 1.0), seed=0)
    assert len(members[0.01]) == 10 and len(members[0.1]) == 100 and members[1.0] == set(ids)
    assert members[0.01] < members[0.1] < members[1.0]
    assert members == fraction_members(list(reversed(ids)), (0.01, 0.1, 1.0), seed=0)  # order-free
    assert members[0.1] != fraction_members(ids, (0.1,), seed=1)[0.1]
    more = fraction_members(ids + [f"new{i}" for i in range(10)], (0.1,), seed=0)[0.1]
    assert len(more & members[0.1]) >= 90  # a few new utterances move few chosen ones

    labels = write_stores(tmp_path, planted_in_layer_01)
    config = ProbeConfig(epochs=4, batch_size=256, learning_rates=(1e-2,), weight_decays=(0.0,))
    result = probe_phones(
        open_representations(tmp_path / "reps", include_input=False),
        labels,
        config,
        [f"c{i}" for i in range(4)],
        progress=False,
        kinds=("linear",),
        fractions=(0.1, 1.0),
    )
    assert result["fraction_utterances"] == {"0.1": 6, "1": 60}
    small = {p["layer"]: p for p in result["probes"] if p["fraction"] == 0.1}
    assert set(small) == {"layer_00", "layer_01", "layer_02"}
    assert small["layer_01"]["accuracy"] > 0.8  # a planted signal needs few labels


def test_speaker_independent_selection_keeps_only_unheard_speakers():
    table = {
        "a1": Utterance("train", "c", "ann"),
        "a2": Utterance("test", "c", "ann"),
        "b1": Utterance("test", "c", "bob"),
        "b2": Utterance("dev", "c", "bob"),
        "c1": Utterance("dev", "c", "cat"),
        "k1": Utterance("test", "k", "kim", "yes"),
    }
    chosen = select_utterances(table, corpora=["c"], speaker_independent=True)
    assert chosen["test"] == {"b1"} and chosen["dev"] == {"b2", "c1"} and chosen["train"] == {"a1"}
    closed = select_utterances(table)
    assert closed["test"] == {"a2", "b1", "k1"}
    assert select_utterances(table, need_keyword=True)["test"] == {"k1"}
    with pytest.raises(ValueError, match="not in the features"):
        select_utterances(table, corpora=["nope"])


def test_keyword_probe_classifies_utterances(tmp_path):
    rng = np.random.default_rng(1)
    words = ("yes", "no", "up")
    keywords = {}
    for split, count in SPLIT_SIZES.items():
        with (
            RaggedWriter(tmp_path / split / "layer_00", DIM) as w0,
            RaggedWriter(tmp_path / split / "layer_01", DIM) as w1,
        ):
            for i in range(count):
                utt, word = f"{split}_{i}", i % 3
                keywords[utt] = words[word]
                frames = rng.normal(0, 1, (30, DIM))
                w0.append(utt, frames)
                w1.append(
                    utt, frames + np.eye(3, DIM)[word] * 2
                )  # the keyword shifts layer 1's mean
    reps = open_representations(tmp_path, include_input=False)
    config = ProbeConfig(epochs=100, batch_size=0, learning_rates=(1e-2,), weight_decays=(0.0,))
    result = probe_labels(
        reps, keywords, "keyword", config, progress=False, kinds=("linear", "weighted_sum")
    )
    assert result["task"] == "keyword" and result["classes"] == sorted(words)
    assert result["layers"]["layer_01"]["accuracy"] > 0.9 > result["layers"]["layer_00"]["accuracy"]
    assert len(result["layers"]["layer_01"]["confusion"]["matrix"]) == 3


def test_probe_section_is_validated_once_from_the_package_settings():
    """The stage's task sections extend the package's ProbeConfig and MLPSettings: a partial
    utterance-task section keeps the utterance defaults, and every error names its parameter."""
    from mockingjay.config import ParamError, from_section
    from mockingjay.probe_config import PHONE_PROBE, SPEAKER_PROBE
    from stages.probe_params import ProbeStageConfig

    config = from_section(
        ProbeStageConfig,
        {"speaker": {"kinds": ["weighted_sum"]}, "phone": {"mlp": {"layers": ["input"]}}},
        "probe",
    )
    assert config.speaker.training() == SPEAKER_PROBE and config.keyword.training() == SPEAKER_PROBE
    assert config.phone.training() == PHONE_PROBE
    options = config.phone.options()
    assert options["mlp"].weight_decays == PHONE_PROBE.weight_decays and options["mlp"].layers == (
        "input",
    )
    for section, message in [
        ({"phone": {"mlp": {"dropout": 2}}}, "probe.phone.mlp.dropout: must be in [0, 1)"),
        ({"keyword": {"eval_batch": 0}}, "probe.keyword.eval_batch: must be >= 1"),
        ({"speaker": {"weight_decays": []}}, "probe.speaker.weight_decays: need at least one"),
    ]:
        with pytest.raises(ParamError, match=re.escape(message)):
            from_section(ProbeStageConfig, section, "probe")
