"""Study outputs: the headline record, the README tables generated from metrics, the float16 release."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mockingjay.checkpoint import load_model_dir, release_model_dir, save_model_dir
from mockingjay.model import MockingjayForMAM, ModelConfig
from stages.report import headline_of
from stages.report_tables import render_readme, runs_table, study_table, tables

ROOT = Path(__file__).resolve().parents[1]


def _layer(acc: float, majority: float = 0.1) -> dict:
    return {"accuracy": acc, "macro_f1": acc / 2, "majority_rate": majority}


def fake_results() -> dict:
    phone_layers = {
        "input": _layer(0.40),
        "layer_00": _layer(0.41),
        "layer_01": _layer(0.47),
        "layer_02": _layer(0.45),
    }
    probes = [{"kind": "linear", "layer": n, "fraction": 1.0, **v} for n, v in phone_layers.items()]
    probes += [
        {
            "kind": "weighted_sum",
            "layer": "weighted_sum",
            "fraction": 1.0,
            **_layer(0.48),
            "layer_weights": {"layer_00": 0.2, "layer_01": 0.5, "layer_02": 0.3},
        },
        {"kind": "mlp", "layer": "input", "fraction": 1.0, **_layer(0.44)},
        {"kind": "mlp", "layer": "layer_02", "fraction": 1.0, **_layer(0.52)},
        {"kind": "linear", "layer": "input", "fraction": 0.1, **_layer(0.30)},
        {"kind": "linear", "layer": "layer_01", "fraction": 0.1, **_layer(0.38)},
    ]
    speaker_layers = {
        "input": _layer(0.6, 0.01),
        "layer_00": _layer(0.7, 0.01),
        "layer_01": _layer(0.9, 0.01),
        "layer_02": _layer(0.8, 0.01),
    }
    return {
        "phone": {"layers": phone_layers, "probes": probes, "examples": {"test": 1000}},
        "speaker": {"layers": speaker_layers, "probes": [], "examples": {"test": 50}},
    }


def test_headline_is_compact_and_complete():
    pretrain = {"audio_hours_seen": 20.5, "train_seconds": 3000.0, "steps": 1600, "device": "cpu"}
    headline = headline_of(
        fake_results(), pretrain, {800: {"phone": 0.44, "audio_hours_seen": 10.2}}
    )
    phone = headline["phone"]
    assert phone["logmel"] == 0.40 and phone["majority"] == 0.1
    assert phone["layers"] == [0.41, 0.47, 0.45]  # hidden state 0, 1, 2: the input is not a layer
    assert (
        phone["weighted_sum"] == 0.48 and phone["mlp_best"] == 0.52 and phone["mlp_logmel"] == 0.44
    )
    assert phone["label_fractions"]["0.1"] == {
        "logmel": 0.30,
        "best_layer": 0.38,
        "weighted_sum": None,
    }
    assert phone["label_fractions"]["1"]["best_layer"] == 0.47
    assert headline["speaker"]["weighted_sum"] is None and headline["speaker"]["mlp_best"] is None
    assert headline["pretrain"] == {
        "audio_hours_seen": 20.5,
        "train_seconds": 3000.0,
        "steps": 1600,
        "device": "cpu",
        "heldout_loss_initial": None,
        "heldout_loss_final": None,
    }
    assert headline["curve"] == [{"step": 800, "phone": 0.44, "audio_hours_seen": 10.2}]
    json.dumps(headline)
    table = study_table(headline)
    assert (
        "| log-mel (input, per-utterance CMVN as the model sees it) | 40.0 | 60.0 | 49.1 | 70.1 |"
        in table
    )
    assert "| layer 1 | 47.0 | 90.0 |" in table and "| MLP probe, best layer | 52.0 |" in table


def test_two_runs_are_compared_each_against_its_own_input():
    pretrain = {"steps": 10}
    first = headline_of(fake_results(), pretrain)
    second_results = fake_results()
    second_results["phone"]["layers"]["input"] = _layer(0.38)  # another input: its own log-mel row
    second_results["phone"]["layers"]["layer_01"] = _layer(0.50)
    second = headline_of(second_results, pretrain)
    table = runs_table(first, second, ("A", "B")).splitlines()
    assert table[0] == "| representation | phone, A | phone, B | speaker, A | speaker, B |"
    assert "| log-mel input the model was trained on | 40.0 | 38.0 | 60.0 | 60.0 |" in table
    assert "| layer 1 | 47.0 | 50.0 | 90.0 | 90.0 |" in table
    assert "| best layer minus log-mel (points) | 7.0 | 12.0 | 30.0 | 30.0 |" in table


def test_readme_tables_are_generated_from_the_committed_metrics():
    readme = (ROOT / "README.md").read_text()
    generated = tables(ROOT)
    for name in generated:
        assert f"<!-- results:{name} -->" in readme, f"README lacks the {name} table markers"
    assert render_readme(readme, generated) == readme, (
        "README tables are stale: run `mockingjay results-table`"
    )


def test_render_replaces_only_between_markers():
    text = "a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n"
    assert (
        render_readme(text, {"x": "new"}) == "a\n<!-- results:x -->\nnew\n<!-- /results:x -->\nb\n"
    )


def test_release_is_float16_and_loads_as_a_model(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(
        input_dim=8, target_dim=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    model = MockingjayForMAM(config).eval()
    save_model_dir(tmp_path / "model", model, config)
    out = release_model_dir(tmp_path / "model", tmp_path / "release", {"hop_ms": 10.0})
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    assert json.loads((out / "feature_config.json").read_text()) == {"hop_ms": 10.0}
    released, _ = load_model_dir(out)
    x, lengths = torch.randn(2, 30, 8), torch.tensor([30, 20])
    with torch.no_grad():
        difference = (model(x, lengths) - released(x, lengths))[1, :20].abs().max()
    assert 0 < difference < 5e-2  # float16 weights, float32 compute: close, not equal
    assert (out / "model.safetensors").stat().st_size < (
        tmp_path / "model" / "model.safetensors"
    ).stat().st_size
