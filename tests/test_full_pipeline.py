"""End to end: the whole `dvc repro` (prepare .. probe) on the fixtures with a tiny model, then the
`mockingjay probe` command a user runs, and a DVC experiment landing in the same MLflow store."""

from __future__ import annotations

import json

import pytest

from .conftest import mlflow_runs, run

pytestmark = pytest.mark.slow


def test_repro_writes_probe_metrics_plots_and_report(pipeline_repo):
    repo = pipeline_repo
    metrics = json.loads((repo / "metrics/probe.json").read_text())
    assert set(metrics) == {"phone", "speaker"}
    for task in ("phone", "speaker"):
        assert set(metrics[task]) == {"input", "layer_00", "layer_01", "layer_02"}
        for row in metrics[task].values():
            assert 0.0 <= row["majority_rate"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    # A linear probe on log-mel frames must beat always answering the majority phone.
    assert metrics["phone"]["input"]["accuracy"] > metrics["phone"]["input"]["majority_rate"] + 0.03
    table = (repo / "plots/probe_accuracy.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["layer", "phone", "phone_logmel", "speaker", "speaker_logmel"]
    assert [line.split("\t")[0] for line in table[1:]] == ["0", "1", "2"]
    assert (repo / "reports/probe/probe_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads((repo / "reports/probe/results.json").read_text())
    assert len(full["phone"]["layers"]["layer_01"]["confusion"]["matrix"]) == 40
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout


def test_mlflow_probe_parent_run_carries_pretrain_params_and_child_runs(pipeline_repo, tmp_path):
    runs = mlflow_runs(pipeline_repo)
    stages = {r.data.tags.get("mockingjay.stage") for r in runs}
    assert {"prepare", "align", "featurize", "pretrain", "extract", "probe"} <= stages
    parents = [
        r
        for r in runs
        if r.data.tags.get("mockingjay.stage") == "probe"
        and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["pretrain.model.hidden_size"] == "32"
    assert parent.data.params["pretrain.training.total_steps"] == "30"
    for name in ("input", "layer_00", "layer_02"):
        assert f"phone_accuracy.{name}" in parent.data.metrics
        assert f"speaker_accuracy.{name}" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"{task}/{name}"
        for task in ("phone", "speaker")
        for name in ("input", "layer_00", "layer_01", "layer_02")
    )
    child = next(r for r in children if r.info.run_name == "phone/layer_01")
    assert child.data.metrics["accuracy"] == pytest.approx(
        parent.data.metrics["phone_accuracy.layer_01"]
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    client.download_artifacts(child.info.run_id, "confusion.json", str(tmp_path))
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert len(confusion["labels"]) == 40 and len(confusion["matrix"]) == 40


def test_probe_one_layer_the_baseline_and_bad_layers(pipeline_repo):
    one = run(["mockingjay", "probe", "--layer", "1"], pipeline_repo)
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "phone", "acc"]
    rows = [line.split()[0] for line in lines[2:] if line and not line.startswith("(")]
    assert rows == ["1", "majority"]
    stored = json.loads((pipeline_repo / "metrics/probe.json").read_text())
    accuracy = float(lines[2].split()[1].rstrip("%")) / 100
    assert accuracy == pytest.approx(
        stored["phone"]["layer_01"]["accuracy"], abs=0.0006
    )  # deterministic
    baseline = run(["mockingjay", "probe", "--layer", "input"], pipeline_repo)
    assert baseline.returncode == 0 and baseline.stdout.splitlines()[2].startswith("log-mel")
    for bad in ("99", "-1", "seven"):
        result = run(["mockingjay", "probe", "--layer", bad], pipeline_repo)
        assert result.returncode == 2, result.stderr
        assert "--layer" in result.stderr
    out_of_range = run(["mockingjay", "probe", "--layer", "99"], pipeline_repo)
    assert "0..2" in out_of_range.stderr


def test_probe_checkpoint_runs_online_and_agrees_with_extracted(pipeline_repo):
    online = run(
        ["mockingjay", "probe", "--layer", "2", "--checkpoint", "models/pretrain/model"],
        pipeline_repo,
    )
    assert online.returncode == 0, online.stderr
    accuracy = float(online.stdout.splitlines()[2].split()[1].rstrip("%")) / 100
    stored = json.loads((pipeline_repo / "metrics/probe.json").read_text())
    assert accuracy == pytest.approx(stored["phone"]["layer_02"]["accuracy"], abs=0.05)
    missing = run(["mockingjay", "probe", "--checkpoint", "models/nowhere"], pipeline_repo)
    assert missing.returncode == 1 and "models/nowhere" in missing.stderr
    assert "Traceback" not in missing.stderr and "not found" in missing.stderr


def test_dvc_experiment_lands_in_the_same_store_with_its_name(pipeline_repo):
    # `dvc exp run` in the workspace, as a user tries a value; a probe setting, so only probe reruns
    # (tests/test_reliability.py queues experiments that retrain, in DVC's temporary copies)
    before = len(mlflow_runs(pipeline_repo))
    result = run(
        ["dvc", "exp", "run", "-n", "fewer-epochs", "-S", "probe.phone.epochs=2"], pipeline_repo
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("pretrain", "extract"):
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout, result.stdout[-3000:]
    runs = mlflow_runs(pipeline_repo)
    tagged = [r for r in runs if r.data.tags.get("dvc_exp_name") == "fewer-epochs"]
    assert len(runs) > before and tagged
    assert {r.data.tags["mockingjay.stage"] for r in tagged} == {"probe"}
    probe = next(r for r in tagged if "mlflow.parentRunId" not in r.data.tags)
    assert probe.data.params["phone.epochs"] == "2"
    assert {r.info.status for r in tagged} == {"FINISHED"}
    shown = run(["dvc", "exp", "show", "--json"], pipeline_repo)
    assert "fewer-epochs" in shown.stdout
