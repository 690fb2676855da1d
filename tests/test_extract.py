"""Representation extraction: store layout, values equal to a direct encoder forward, errors; the
one owner of the store's files and of the folders' names."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mockingjay.extract import (
    ExtractError,
    extract_representations,
    length_sorted_batches,
)
from mockingjay.featstore import (
    PresizedWriter,
    RaggedArray,
    RaggedWriter,
    StoreError,
    fingerprint,
    is_store,
)
from mockingjay.feature_config import FEATURE_PRESETS, FeatureConfig, frames_per_second
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.store_layout import (
    INPUT_STORE,
    is_store_name,
    layer_index,
    layer_indices,
    layer_names,
    layer_store_name,
    target_store,
)
from stages.extract import totals

DIM = 12
LENGTHS = [37, 5, 80, 1, 23, 64, 64, 9, 41, 17]  # unsorted, with ties and a 1-frame utterance


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny tensors here: see conftest.one_torch_thread."""


def tiny_model(downsample_rate: int = 1, seed: int = 0) -> MockingjayForMAM:
    torch.manual_seed(seed)
    return MockingjayForMAM(
        ModelConfig(
            input_dim=DIM,
            target_dim=DIM,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            downsample_rate=downsample_rate,
        )
    )


def feature_store(path: Path, attrs: dict | None = None) -> RaggedArray:
    rng = np.random.default_rng(0)
    with RaggedWriter(path, DIM, "float16", {"kind": "input", **(attrs or {})}) as writer:
        for i, length in enumerate(LENGTHS):
            writer.append(f"utt{i:02d}", rng.normal(0, 1, (length, DIM)))
    return RaggedArray(path)


def direct_forward(model: MockingjayForMAM, rows: np.ndarray) -> list[np.ndarray]:
    """Every hidden state of one utterance, alone in its batch, at the feature frame rate."""
    features = torch.from_numpy(np.asarray(rows, dtype=np.float32))[None]
    with torch.no_grad():
        states = model.encoder(features, torch.tensor([len(rows)])).hidden_states
    r = model.config.downsample_rate
    return [s[0].repeat_interleave(r, 0)[: len(rows)].numpy() for s in states]


@pytest.mark.parametrize("downsample_rate", [1, 3])
def test_stores_match_feature_store_and_direct_forward(tmp_path, downsample_rate):
    store = feature_store(tmp_path / "features")
    model = tiny_model(downsample_rate)
    model.train()
    calls = []
    summary = extract_representations(
        model,
        store,
        tmp_path / "reps",
        batch_frames=100,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert model.training  # the caller's mode is restored
    assert summary["stores"] == ["input", "layer_00", "layer_01", "layer_02"]
    assert summary["items"] == len(LENGTHS) and summary["frames"] == sum(LENGTHS)
    assert summary["batches"] > 3  # batch_frames=100 really splits the store
    assert calls[-1] == (sum(LENGTHS), sum(LENGTHS))
    written = {name: RaggedArray(tmp_path / "reps" / name) for name in summary["stores"]}
    assert summary["bytes_written"] == sum(
        f.stat().st_size for s in written.values() for f in s.path.iterdir()
    )
    for name, out in written.items():
        assert (
            out.ids == store.ids and out.lengths.tolist() == LENGTHS
        )  # same order, feature frame rate
        assert out.dtype == np.float16 and out.dim == (DIM if name == "input" else 32)
        assert out.attrs["layer"] == (None if name == "input" else int(name[-2:]))
    for item in range(len(store)):
        np.testing.assert_array_equal(written["input"][item], store[item])
        expected = direct_forward(model.eval(), store[item])
        for layer in range(3):
            np.testing.assert_allclose(
                np.asarray(written[layer_store_name(layer)][item], np.float32),
                expected[layer],
                atol=2e-2,
                rtol=1e-2,
            )
    if downsample_rate == 3:  # each step is repeated over its 3 frames
        layer = np.asarray(written["layer_02"][2])
        np.testing.assert_array_equal(layer[0], layer[2])
        assert not np.array_equal(layer[2], layer[3])


def test_selected_layers_only_and_batching_does_not_change_values(tmp_path):
    store = feature_store(tmp_path / "features")
    model = tiny_model()
    small = extract_representations(
        model,
        store,
        tmp_path / "small",
        layers=[2, 0, 2],
        batch_frames=64,
        include_input=False,
        progress=False,
    )
    assert small["stores"] == ["layer_00", "layer_02"] and small["layers"] == [0, 2]
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["layer_00", "layer_02"]
    big = extract_representations(
        model, store, tmp_path / "big", layers=[2], batch_frames=10_000, progress=False
    )
    assert big["batches"] < small["batches"]  # the two runs really batch differently
    a, b = RaggedArray(tmp_path / "small" / "layer_02"), RaggedArray(tmp_path / "big" / "layer_02")
    np.testing.assert_allclose(
        np.asarray(a.data, np.float32), np.asarray(b.data, np.float32), atol=4e-3
    )


def test_length_sorted_batches_cap_padded_frames():
    lengths = np.array(LENGTHS)
    batches = length_sorted_batches(lengths, 100)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 100 or len(batch) == 1
        assert list(lengths[batch]) == sorted(lengths[batch], reverse=True)
    assert length_sorted_batches(lengths, 10)[0].tolist() == [2]  # longer than the cap: alone


def test_errors_name_the_layer_range_and_the_dims(tmp_path):
    store = feature_store(tmp_path / "features")
    with pytest.raises(ExtractError, match=r"layer index 3 out of range: valid layers are 0\.\.2"):
        extract_representations(
            tiny_model(), store, tmp_path / "out", layers=[0, 3], progress=False
        )
    assert not (tmp_path / "out" / "layer_00").exists()
    wide = MockingjayForMAM(
        ModelConfig(
            input_dim=DIM + 1,
            target_dim=DIM,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            intermediate_size=64,
        )
    )
    with pytest.raises(
        ExtractError, match=r"features have 12 dims but the model expects input_dim=13"
    ):
        extract_representations(wide, store, tmp_path / "out", progress=False)
    assert not any(
        p.name.startswith(".") for p in (tmp_path / "out").iterdir()
    )  # no temporary left behind


PAPER = FeatureConfig(**FEATURE_PRESETS["paper"])  # 12.5 ms hop: 80 frames per second


def test_audio_seconds_count_frames_at_the_stores_own_hop(tmp_path, monkeypatch):
    # issue 12: a fixed 100 frames/s made the paper preset's figure 25% too low
    clock = iter([100.0, 102.0, 200.0, 202.0, 300.0, 302.0])  # each run takes 2 s
    monkeypatch.setattr(
        "mockingjay.extract.time", SimpleNamespace(perf_counter=lambda: next(clock))
    )
    store = feature_store(tmp_path / "paper", {"feature_config": PAPER.to_dict()})
    summary = extract_representations(
        tiny_model(), store, tmp_path / "a", layers=[1], progress=False
    )
    assert summary["audio_seconds_per_second"] == round(sum(LENGTHS) / 80 / 2, 1) == 2.1
    # an explicit rate wins; a store recording no settings gives no figure rather than a guess
    summary = extract_representations(
        tiny_model(), store, tmp_path / "b", layers=[1], progress=False, frame_rate=50
    )
    assert summary["audio_seconds_per_second"] == round(sum(LENGTHS) / 50 / 2, 1)
    bare = extract_representations(
        tiny_model(), feature_store(tmp_path / "bare"), tmp_path / "c", layers=[1], progress=False
    )
    assert bare["audio_seconds_per_second"] is None


def test_stage_totals_use_the_feature_settings_frame_rate():
    summaries = {
        "train": {"items": 3, "frames": 6000, "bytes_written": 10, "seconds": 5.0},
        "test": {"items": 1, "frames": 2000, "bytes_written": 4, "seconds": 5.0},
    }
    rate = frames_per_second(PAPER.to_dict())
    assert rate == 80.0 and frames_per_second(FeatureConfig().to_dict()) == 100.0
    total = totals(summaries, [0, 1, 2], rate)
    assert total["audio_seconds_per_second"] == 10.0  # 8000 frames = 100 s of audio in 10 s
    assert (total["utterances"], total["frames"], total["layers"], total["bytes_written"]) == (
        4,
        8000,
        3,
        14,
    )


# -- one owner for the store's files and the folders' names ------------------------------------


def test_presized_writer_in_any_order_equals_the_appending_writer(tmp_path):
    template = feature_store(tmp_path / "features")
    rows = [np.asarray(template[i], np.float32) * 2 for i in range(len(template))]
    writer = PresizedWriter(tmp_path / "presized", template, DIM, {"kind": "x"})
    for i in reversed(range(len(template))):
        if len(rows[i]) > 2:  # in two pieces: the item counts as written with its last rows
            writer.write(i, rows[i][:2])
            writer.write(i, rows[i][2:], 2)
        else:
            writer.write(i, rows[i])
    writer.close()
    with RaggedWriter(tmp_path / "appended", DIM, "float16", {"kind": "x"}) as appended:
        for item_id, item_rows in zip(template.ids, rows):
            appended.append(item_id, item_rows)
    for name in ("data.bin", "index.tsv", "meta.json"):
        assert (tmp_path / "presized" / name).read_bytes() == (
            tmp_path / "appended" / name
        ).read_bytes(), name
    assert fingerprint([tmp_path / "presized"]) == fingerprint([tmp_path / "features"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "appended",
        "features",
        "presized",
    ]  # no temporaries

    incomplete = PresizedWriter(tmp_path / "incomplete", template, DIM)
    incomplete.write(0, rows[0])
    with pytest.raises(StoreError, match=r"incomplete: item 'utt01' was never written"):
        incomplete.close()
    assert not is_store(tmp_path / "incomplete") and not (tmp_path / "incomplete").exists()
    wrong_shape = PresizedWriter(tmp_path / "shape", template, DIM)
    with pytest.raises(ValueError, match=r"item 'utt00': got \[37, 3\] rows"):
        wrong_shape.write(0, np.zeros((37, 3)))
    wrong_shape.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appended", "features", "presized"]


def test_layer_store_names_round_trip_and_malformed_ones_are_refused(tmp_path):
    for index in (0, 1, 9, 12, 99, 100):
        assert layer_index(layer_store_name(index)) == index and is_store_name(
            layer_store_name(index)
        )
    assert layer_store_name(3) == "layer_03" and layer_store_name(12) == "layer_12"
    for name in (
        "layer_3",
        "layer_003",
        "layer_",
        "layer_xx",
        "layer_-1",
        "Layer_03",
        "layer_03 ",
        "layer_\u0663\u0663",
        "weighted_sum",
        "mlp:layer_03",
        "layer_03@0.1",
        INPUT_STORE,
        "",
        "layer_weights",
    ):
        assert layer_index(name) is None, name
    assert (
        is_store_name(INPUT_STORE)
        and not is_store_name("layer_3")
        and not is_store_name("weighted_sum")
    )
    with pytest.raises(ValueError):
        layer_store_name(-1)
    assert layer_names(["input", "layer_10", "weighted_sum", "layer_02", "layer_3"]) == [
        "layer_02",
        "layer_10",
    ]
    for name in ("layer_00", "layer_02", "layer_3", "input", ".layer_01.tmp-12"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert layer_indices(tmp_path / "train") == [0, 2] and layer_indices(tmp_path / "missing") == []
    assert target_store(tmp_path / "features" / "dev") == tmp_path / "features" / "dev_target"


ROOT = Path(__file__).resolve().parents[1]
# string constants (f-string pieces included, docstrings not) that only the owner module may hold
OWNED = {
    "mockingjay/featstore.py": lambda text: any(
        n in text for n in ("data.bin", "index.tsv", "meta.json")
    ),
    "mockingjay/store_layout.py": lambda text: (
        (text.startswith("layer_") and not text[6:7].isalpha())
        or text
        in ("_target", "train_target", "dev_target", "test_target", "labels", "frame_labels")
        or any(n in text for n in ("utterances.tsv", "feature_config.json"))
    ),
}


def _constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_only_the_owner_names_the_store_files_and_the_folder_layout():
    """featstore.py alone names a store's files; store_layout.py alone builds and parses the stores'
    names in a folder (a second `f"layer_{i:02d}"` or `name[6:]` drifts from the first)."""
    allowed_elsewhere = {("mockingjay/probe_heads.py", "labels")}  # a confusion matrix's JSON key
    found = []
    for package in ("mockingjay", "stages", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for line, text in _constants(path):
                found += [
                    f"{where}:{line}: {text!r} (owner {owner})"
                    for owner, owns in OWNED.items()
                    if where != owner and owns(text) and (where, text) not in allowed_elsewhere
                ]
    assert not found, "\n".join(found)


def test_only_the_atomic_module_renames_into_place_and_fsyncs():
    """Every atomic write goes through mockingjay/atomic.py (temporary beside, fsync, rename, fsync
    the folder); resume_state.py moves an older layout's entries into the folder it then publishes."""
    moves = {"mockingjay/resume_state.py": {"replace"}}
    found = []
    for package in ("mockingjay", "stages", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            if where == "mockingjay/atomic.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "os"
                    and node.attr in ("replace", "rename", "renames", "fsync")
                    and node.attr not in moves.get(where, ())
                ):
                    found.append(f"{where}:{node.lineno}: os.{node.attr}")
    assert not found, "\n".join(found)
