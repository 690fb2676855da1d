"""End to end: `mockingjay pretrain` as a subprocess on real features: killed, resumed, tracked."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from mockingjay.checkpoint import load_model_dir

from .conftest import cli_env, copy_repo, mlflow_runs, run

pytestmark = pytest.mark.slow

TINY = {
    "preset": "tera-base",
    "model": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_layers": 2},
    "mask": {},
    "train": {
        "total_steps": 60,
        "learning_rate": 2.0e-3,
        "max_frames_per_batch": 2000,
        "max_length": 200,
        "log_every": 2,
        "checkpoint_every": 4,
        "keep_checkpoints": 2,
        "seed": 0,
        "device": "cpu",
    },
}


# The pipeline's metrics and plot files: written only when asked for, as dvc.yaml does.
RECORDS = ["--metrics", "metrics/pretrain.json", "--plot", "plots/pretrain_loss.tsv"]


def set_pretrain(repo: Path, pretrain: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"] = pretrain
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(featurized_repo, tmp_path) -> Path:
    repo = copy_repo(featurized_repo, tmp_path / "repo")
    set_pretrain(repo, TINY)
    return repo


def test_pretrain_is_killed_resumes_and_logs_to_mlflow(repo):
    proc = subprocess.Popen(["mockingjay", "pretrain", *RECORDS], cwd=repo, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = repo / "models" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoints.glob("config-*/step-*")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(p.name for p in checkpoints.glob("config-*/step-*"))
    assert killed_at, "no checkpoint before the kill"
    assert not (repo / "models/pretrain/model").exists(), "the run finished before it could be killed"

    resumed = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stderr
    metrics = json.loads((repo / "metrics/pretrain.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["heldout_loss_final"] < 0.9 * metrics["heldout_loss_initial"]
    model, config = load_model_dir(repo / "models/pretrain/model")
    assert config.hidden_size == 32 and config.num_layers == 2
    saved = json.loads((repo / "models/pretrain/model/config.json").read_text())
    assert saved["features"]["n_mels"] == 80  # the feature settings travel with the model
    assert len(list(checkpoints.glob("config-*/step-*"))) == 2  # keep_checkpoints
    plot = (repo / "plots/pretrain_loss.tsv").read_text().splitlines()
    assert plot[0].split("\t")[:2] == ["step", "loss"]
    # the loss log spans the whole run: steps before the kill (kept) and after it, none twice
    assert [int(line.split("\t")[0]) for line in plot[1:]] == list(range(2, 61, 2))

    runs = [r for r in mlflow_runs(repo) if r.data.tags.get("mockingjay.stage") == "pretrain"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1
    done = finished[0]
    assert done.data.tags["resumed_from"].endswith(killed_at[-1])
    assert done.data.params["model.hidden_size"] == "32"
    assert done.data.params["train.learning_rate"] == "0.002"
    for key in ("loss", "learning_rate", "grad_norm", "audio_seconds_per_second", "heldout_loss_final"):
        assert key in done.data.metrics, key
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    history = client.get_metric_history(done.info.run_id, "loss")
    assert len(history) >= 10 and all(h.step > int(killed_at[-1].split("-")[1]) for h in history)
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert {"reconstruction.png", "loss_curve.png", "config.json"} <= artifacts
    system = [k for k in done.data.metrics if k.startswith("system/")]
    assert system, "system metrics were not logged"


def test_finished_run_reports_whole_and_other_features_or_config_start_afresh(repo):
    set_pretrain(repo, dict(TINY, train={**TINY["train"], "total_steps": 20}))
    first = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert first.returncode == 0, first.stderr
    metrics = json.loads((repo / "metrics/pretrain.json").read_text())
    plot = (repo / "plots/pretrain_loss.tsv").read_text()
    # DVC reruns the stage when an upstream hash changes: the finished run is resumed at its last
    # step, and its outputs still report the whole run, not an empty one
    again = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 20" in again.stderr and "no step trained in this run" in again.stderr
    resumed = json.loads((repo / "metrics/pretrain.json").read_text())
    for key in ("steps", "heldout_loss_initial", "heldout_loss_final", "train_loss_final"):
        assert resumed[key] == metrics[key], key
    assert resumed["audio_seconds_per_second"] is None and metrics["audio_seconds_per_second"] > 0
    assert (repo / "plots/pretrain_loss.tsv").read_text() == plot

    # other features with the same shape (no CMVN instead of per-utterance): not resumed
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["featurize"]["cmvn"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    featurized = run(["mockingjay", "featurize"], repo)
    assert featurized.returncode == 0, featurized.stderr
    other_features = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert other_features.returncode == 0, other_features.stderr
    assert "starting afresh" in other_features.stderr and "resumed at step" not in other_features.stderr
    # and another training config: not resumed either
    set_pretrain(repo, dict(TINY, train={**TINY["train"], "total_steps": 8}))
    shorter = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert shorter.returncode == 0, shorter.stderr
    assert "starting afresh" in shorter.stderr
    assert json.loads((repo / "metrics/pretrain.json").read_text())["steps"] == 8

