"""Tracking never costs a stage its work (issue 13): the real MLflow SQLite store deleted in the middle
of a real `mockingjay pretrain`, which must still train to the end and write every output."""

from __future__ import annotations

import json

import pytest

from .test_reliability_stop import RECORDS, logged_steps, repo, set_train, watched  # noqa: F401 (repo: fixture)

pytestmark = pytest.mark.slow


def test_deleting_the_mlflow_store_mid_pretrain_warns_once_finishes_training_and_exits_1(repo):  # noqa: F811
    total = 24
    set_train(repo, total_steps=total, log_every=2, checkpoint_every=8)
    store = repo / "mlflow.db"
    assert store.is_file()
    with watched(["mockingjay", "pretrain", *RECORDS], repo) as training:
        # the first training record is written just before it goes to MLflow: the run is logging now
        states = lambda: list((repo / "models/checkpoints").glob("config-*/train_log.jsonl"))  # noqa: E731
        training.wait_for(lambda: bool(states()) and states()[0].stat().st_size > 0)
        store.unlink()
        status = training.proc.wait()
        training.reader.join(10)
    output = training.output
    assert status == 1, output[-3000:]
    assert "Traceback" not in output, output[output.find("Traceback") - 1500 :][:4000]
    assert output.count("warning: mlflow:") == 1, output[-3000:]
    warnings = [line for line in output.splitlines() if line.startswith("warning: mlflow:")]
    assert len(warnings) == 1, output[-3000:]  # on a line of its own, not glued to the progress bar
    assert (
        f"tracking to sqlite:///{store} failed (" in warnings[0]
        and "pretrain goes on" in warnings[0]
    )
    summary = [line for line in output.splitlines() if line.startswith("error: mlflow:")]
    assert len(summary) == 1, output[-3000:]
    assert (
        "failed during the pretrain run" in summary[0]
        and "not logged:" in summary[0]
        and "log_metrics" in summary[0]
    )
    assert "The stage's outputs are complete" in summary[0]
    # training and every output of the stage are complete, as in a run whose tracking worked
    model = repo / "models/pretrain/model"
    assert (model / "model.safetensors").stat().st_size > 0 and json.loads(
        (model / "config.json").read_text()
    )
    assert json.loads((repo / "metrics/pretrain.json").read_text())["steps"] == total
    (state,) = (repo / "models/checkpoints").glob("config-*")
    assert logged_steps(state) == list(range(2, total + 1, 2))
    plot = (repo / "plots/pretrain_loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in plot[1:]] == list(range(2, total + 1, 2))
