"""Linear probes on synthetic stores: planted signal is found, noise is not, one pass = per layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.probe import probe_phones
from mockingjay.probe_heads import ProbeConfig, ProbeError
from mockingjay.probe_online import probe_online
from mockingjay.probe_stores import open_representations
from mockingjay.probe_utterance import probe_speakers

SPLIT_SIZES = {"train": 40, "dev": 12, "test": 16}
DIM, CLASSES = 16, 5
CLASS_PRIOR = np.array([0.4, 0.2, 0.2, 0.1, 0.1])  # imbalanced: majority rate 0.4, not 1/5
SPEAKERS = ("ann", "bob", "cat", "dan")
PHONE = ProbeConfig(epochs=6, batch_size=128, learning_rates=(1e-2,), weight_decays=(0.0, 1e-3))
SPEAKER = ProbeConfig(epochs=60, batch_size=0, learning_rates=(3e-2,), weight_decays=(0.0, 1e-3))
NAMES = [f"c{i}" for i in range(CLASSES)]


def make_corpus(root: Path, seed: int = 0, extra_test_speaker: bool = False) -> dict[str, str]:
    """Stores `root/reps/{split}/{input,layer_00,layer_01}` and `root/labels/{split}`; returns speakers.

    layer_00: phone class in dims 0-7 and speaker in dims 8-15, plus noise (linearly decodable).
    input: the same signal scaled by 100 and shifted (exercises per-layer standardisation).
    layer_01: pure noise (a probe can only reach the majority rate).
    """
    rng = np.random.default_rng(seed)
    class_means = rng.normal(0, 1, (CLASSES, DIM // 2)) * 2
    speaker_means = rng.normal(0, 1, (len(SPEAKERS) + 1, DIM // 2)) * 2
    speakers: dict[str, str] = {}
    for split, count in SPLIT_SIZES.items():
        writers = {
            name: RaggedWriter(root / "reps" / split / name, DIM)
            for name in ("input", "layer_00", "layer_01")
        }
        with RaggedWriter(root / "labels" / split, 1, "int16") as label_writer:
            for i in range(count):
                utt = f"{split}_{i:03d}"
                speaker = i % len(SPEAKERS)
                if extra_test_speaker and split == "test" and i == 0:
                    speaker = len(SPEAKERS)
                speakers[utt] = SPEAKERS[speaker] if speaker < len(SPEAKERS) else "zed"
                length = int(rng.integers(20, 60))
                labels = rng.choice(CLASSES, size=length, p=CLASS_PRIOR)
                signal = np.concatenate(
                    [class_means[labels], np.repeat(speaker_means[speaker][None], length, 0)], 1
                )
                signal += rng.normal(0, 0.3, signal.shape)
                labels[rng.random(length) < 0.1] = -1  # some unlabelled frames
                if split == "train" and i == 1:
                    labels[:] = -1  # a wholly unlabelled utterance
                writers["layer_00"].append(utt, signal)
                writers["input"].append(utt, signal * 100 + 50)
                writers["layer_01"].append(utt, rng.normal(0, 1, signal.shape))
                label_writer.append(utt, labels.astype(np.int16))
        for writer in writers.values():
            writer.close()
    return speakers


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny tensors here: see conftest.one_torch_thread."""


def labels_of(root: Path) -> dict[str, RaggedArray]:
    return {split: RaggedArray(root / "labels" / split) for split in SPLIT_SIZES}


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("probe_corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def phone_result(corpus) -> dict:
    root, _ = corpus
    return probe_phones(
        open_representations(root / "reps"), labels_of(root), PHONE, NAMES, progress=False
    )


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def speaker_result(corpus) -> dict:
    root, speakers = corpus
    return probe_speakers(open_representations(root / "reps"), speakers, SPEAKER, progress=False)


def test_phone_probe_finds_planted_signal_and_not_noise(phone_result):
    layers = phone_result["layers"]
    assert list(layers) == ["input", "layer_00", "layer_01"]
    assert layers["layer_00"]["accuracy"] > 0.95
    assert (
        layers["input"]["accuracy"] > 0.95
    )  # scale and offset do not matter after standardisation
    noise = layers["layer_01"]
    assert noise["majority_rate"] == pytest.approx(0.4, abs=0.06)
    assert abs(noise["accuracy"] - noise["majority_rate"]) < 0.08
    assert noise["macro_f1"] < 0.35 < layers["layer_00"]["macro_f1"]
    matrix = np.array(layers["layer_00"]["confusion"]["matrix"])
    assert matrix.shape == (CLASSES, CLASSES) and matrix.sum() == phone_result["examples"]["test"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(layers["layer_00"]["accuracy"])
    assert layers["layer_00"]["weight_decay"] in PHONE.weight_decays
    assert 0 <= layers["layer_00"]["best_epoch"] < PHONE.epochs
    json.dumps(phone_result)  # plain, JSON-serialisable


def test_phone_probe_uses_only_labelled_frames(corpus, phone_result):
    root, _ = corpus
    for split, count in phone_result["examples"].items():
        labels = np.asarray(RaggedArray(root / "labels" / split).data)
        assert count == int((labels >= 0).sum())


def test_speaker_probe_finds_planted_signal_and_not_noise(speaker_result):
    layers = speaker_result["layers"]
    assert speaker_result["classes"] == sorted(SPEAKERS)
    # statistics pooling doubles the width with standard deviations that here carry no speaker
    # signal: one miss in 16 test utterances is allowed
    assert layers["layer_00"]["accuracy"] >= 15 / 16
    assert layers["layer_01"]["accuracy"] < 0.6
    assert speaker_result["ignored"]["test"] == {"utterances": 0, "classes": []}
    json.dumps(speaker_result)


def test_all_layers_in_one_pass_equal_one_layer_at_a_time(corpus, phone_result, speaker_result):
    root, speakers = corpus
    for name, layer in [("input", None), ("layer_00", 0), ("layer_01", 1)]:
        reps = open_representations(
            root / "reps", layers=[] if layer is None else [layer], include_input=layer is None
        )
        alone = probe_phones(reps, labels_of(root), PHONE, NAMES, progress=False)
        assert alone["layers"][name] == phone_result["layers"][name]
        alone = probe_speakers(reps, speakers, SPEAKER, progress=False)
        assert alone["layers"][name] == speaker_result["layers"][name]


def test_streaming_from_memory_map_equals_in_ram(corpus, phone_result):
    root, _ = corpus
    streamed = probe_phones(
        open_representations(root / "reps"),
        labels_of(root),
        PHONE,
        NAMES,
        max_ram_bytes=0,
        progress=False,
    )
    assert not streamed["data_in_ram"] and phone_result["data_in_ram"]
    assert streamed["layers"] == phone_result["layers"]


def test_same_seed_same_result_other_seed_other_order(corpus, phone_result):
    root, _ = corpus
    reps = open_representations(root / "reps", layers=[1], include_input=False)
    again = probe_phones(reps, labels_of(root), PHONE, NAMES, progress=False)
    assert again["layers"]["layer_01"] == phone_result["layers"]["layer_01"]
    other = probe_phones(
        reps, labels_of(root), ProbeConfig(**{**PHONE.to_dict(), "seed": 1}), NAMES, progress=False
    )
    assert (
        other["layers"]["layer_01"]["grid_dev_accuracy"]
        != phone_result["layers"]["layer_01"]["grid_dev_accuracy"]
    )


def test_layer_out_of_range_names_the_valid_range(corpus):
    root, _ = corpus
    with pytest.raises(ProbeError, match=r"layer 5 out of range.*layers 0\.\.1"):
        open_representations(root / "reps", layers=[0, 5])


def test_label_length_mismatch_names_the_utterance(tmp_path, corpus):
    root, _ = corpus
    labels = labels_of(root)
    with RaggedWriter(tmp_path / "bad", 1, "int16") as writer:
        for i, utt in enumerate(labels["dev"].ids):
            rows = np.asarray(labels["dev"][i])
            writer.append(utt, rows[:-1] if i == 3 else rows)
    labels["dev"] = RaggedArray(tmp_path / "bad")
    with pytest.raises(
        ProbeError,
        match=r"dev: utterance 'dev_003' has \d+ representation frames but \d+ frame labels",
    ):
        probe_phones(open_representations(root / "reps"), labels, PHONE, NAMES, progress=False)


def test_missing_label_utterance_is_named(tmp_path, corpus):
    root, _ = corpus
    labels = labels_of(root)
    with RaggedWriter(tmp_path / "short", 1, "int16") as writer:
        for i, utt in enumerate(labels["test"].ids[:-1]):
            writer.append(utt, np.asarray(labels["test"][i]))
    labels["test"] = RaggedArray(tmp_path / "short")
    with pytest.raises(
        ProbeError, match=r"test: utterance 'test_015' has no frame labels.*15 labelled vs 16"
    ):
        probe_phones(open_representations(root / "reps"), labels, PHONE, NAMES, progress=False)


def test_no_labelled_frames_is_an_error(tmp_path, corpus):
    root, _ = corpus
    labels = labels_of(root)
    with RaggedWriter(tmp_path / "none", 1, "int16") as writer:
        for i, utt in enumerate(labels["train"].ids):
            writer.append(utt, np.full(labels["train"].lengths[i], -1, np.int16))
    labels["train"] = RaggedArray(tmp_path / "none")
    with pytest.raises(ProbeError, match="train: no labelled frames"):
        probe_phones(open_representations(root / "reps"), labels, PHONE, NAMES, progress=False)


def test_test_speakers_absent_from_train_are_ignored_and_reported(tmp_path):
    speakers = make_corpus(tmp_path, extra_test_speaker=True)
    result = probe_speakers(
        open_representations(tmp_path / "reps", layers=[0], include_input=False),
        speakers,
        SPEAKER,
        progress=False,
    )
    assert result["ignored"]["test"] == {"utterances": 1, "classes": ["zed"]}
    assert result["examples"]["test"] == SPLIT_SIZES["test"] - 1
    assert "zed" not in result["classes"]
    with pytest.raises(ProbeError, match="utterance 'train_000' has no speaker"):
        probe_speakers(
            open_representations(tmp_path / "reps", layers=[0]), {}, SPEAKER, progress=False
        )


def test_online_mode_agrees_with_extracted_mode(tmp_path, corpus):
    """A tiny random encoder over the planted-signal features: both modes probe the same layers."""
    from mockingjay.extract import extract_representations

    root, speakers = corpus
    torch.manual_seed(0)
    model = MockingjayForMAM(
        ModelConfig(
            input_dim=DIM,
            target_dim=DIM,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
        )
    )
    features = {split: RaggedArray(root / "reps" / split / "layer_00") for split in SPLIT_SIZES}
    for split, store in features.items():
        extract_representations(
            model, store, tmp_path / split, layers=[0, 2], batch_frames=400, progress=False
        )
    extracted_reps = open_representations(tmp_path)
    extracted = {
        "phone": probe_phones(extracted_reps, labels_of(root), PHONE, NAMES, progress=False),
        "speaker": probe_speakers(extracted_reps, speakers, SPEAKER, progress=False),
    }
    # batch_frames and shuffle_frames well under the ~1700 train frames: several pools an epoch
    online = probe_online(
        model,
        features,
        labels_of(root),
        speakers,
        layers=[0, 2],
        phone_config=PHONE,
        speaker_config=SPEAKER,
        batch_frames=400,
        shuffle_frames=500,
        class_names=NAMES,
        progress=False,
    )
    for task in ("phone", "speaker"):
        assert online[task]["examples"] == extracted[task]["examples"]
        for name in ("input", "layer_00", "layer_02"):
            assert online[task]["layers"][name]["accuracy"] == pytest.approx(
                extracted[task]["layers"][name]["accuracy"], abs=0.04
            ), (task, name)
    assert online["phone"]["layers"]["layer_00"]["accuracy"] > 0.9
    # one pass for all layers there too: layer 2 alone gives the same numbers as with the others
    alone = probe_online(
        model,
        features,
        labels_of(root),
        None,
        layers=[2],
        include_input=False,
        phone_config=PHONE,
        batch_frames=400,
        shuffle_frames=500,
        class_names=NAMES,
        progress=False,
    )
    assert alone["phone"]["layers"]["layer_02"] == online["phone"]["layers"]["layer_02"]
    with pytest.raises(ProbeError, match=r"valid layers are 0\.\.2"):
        probe_online(model, features, labels_of(root), layers=[3], progress=False)


def test_online_mode_honours_selections_and_utterance_tasks(tmp_path, corpus):
    """Online: the phone probe on selected utterances only; speaker and a second label task with
    weighted-sum heads on the pooled statistics, equal to extracted mode's (same vectors)."""
    from mockingjay.extract import extract_representations

    root, speakers = corpus
    torch.manual_seed(0)
    model = MockingjayForMAM(
        ModelConfig(
            input_dim=DIM,
            target_dim=DIM,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
        )
    )
    features = {split: RaggedArray(root / "reps" / split / "layer_00") for split in SPLIT_SIZES}
    half = {split: set(store.ids[: len(store) // 2]) for split, store in features.items()}
    groups = {
        utt: "low" if speaker in ("ann", "bob") else "high" for utt, speaker in speakers.items()
    }
    options = {"kinds": ("linear", "weighted_sum")}
    online = probe_online(
        model,
        features,
        labels_of(root),
        None,
        layers=[1, 2],
        phone_config=PHONE,
        batch_frames=400,
        shuffle_frames=500,
        class_names=NAMES,
        progress=False,
        phone_include=half,
        utterance_tasks={
            "speaker": (speakers, SPEAKER, options),
            "group": (groups, SPEAKER, options),
        },
    )
    full = probe_online(
        model,
        features,
        labels_of(root),
        None,
        layers=[1, 2],
        phone_config=PHONE,
        batch_frames=400,
        shuffle_frames=500,
        class_names=NAMES,
        progress=False,
    )
    assert 0 < online["phone"]["examples"]["test"] < full["phone"]["examples"]["test"]
    assert online["group"]["classes"] == ["high", "low"]
    assert {p["kind"] for p in online["speaker"]["probes"]} == {"linear", "weighted_sum"}
    for split in SPLIT_SIZES:
        extract_representations(
            model,
            features[split],
            tmp_path / split,
            layers=[1, 2],
            batch_frames=400,
            progress=False,
        )
    extracted = probe_speakers(
        open_representations(tmp_path), speakers, SPEAKER, progress=False, **options
    )
    for name in ("input", "layer_01", "layer_02"):
        assert online["speaker"]["layers"][name]["accuracy"] == pytest.approx(
            extracted["layers"][name]["accuracy"], abs=0.07
        ), name


def test_scores_equal_scikit_learn_to_the_last_bit():
    """mockingjay.scores replaces scikit-learn's metrics in the probes (an import of 2 s per
    command): the same definitions and float operations, so every reported figure is unchanged."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from mockingjay import scores

    rng = np.random.default_rng(0)
    for trial in range(300):
        count, classes = int(rng.integers(1, 2000)), int(rng.integers(2, 50))
        truth = rng.integers(0, classes, count)
        predicted = np.where(
            rng.random(count) < rng.random(), truth, rng.integers(0, classes, count)
        )
        if trial % 3 == 0:  # classes that are predicted but never true, and the reverse
            predicted = rng.integers(0, max(1, classes // 3), count)
        assert scores.accuracy(truth, predicted) == float(accuracy_score(truth, predicted))
        assert scores.macro_f1(truth, predicted) == float(
            f1_score(truth, predicted, average="macro", zero_division=0)
        )
        expected = confusion_matrix(truth, predicted, labels=list(range(classes)))
        got = scores.confusion_matrix(truth, predicted, classes)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    empty = np.zeros(0, dtype=np.int64)
    assert np.isnan(scores.accuracy(empty, empty)) and np.isnan(scores.macro_f1(empty, empty))
