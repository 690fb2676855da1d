"""`mockingjay finetune` end to end through the CLI, in the tiny pipeline's repository: stopped by
SIGTERM mid-run and resumed to the very metrics of the uninterrupted `dvc repro`, its outputs, its
MLflow runs, and the fine-tuned model read by the online probe, extraction and export."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from mockingjay.checkpoint import load_encoder_dir

from .conftest import copy_repo, mlflow_runs, run
from .test_reliability_stop import progress_step, stop, watched

pytestmark = pytest.mark.slow

OUTPUTS = [
    "--out",
    "models/ft",
    "--checkpoints",
    "models/ft_checkpoints",
    "--metrics",
    "metrics/ft.json",
    "--plot",
    "plots/ft.tsv",
    "--report",
    "reports/ft",
]


@pytest.fixture(scope="module")
def finetuned(pristine_pipeline_repo, tmp_path_factory):
    """The pipeline's repository after `mockingjay finetune` into other folders was stopped by
    SIGTERM during its first run and then run again: (repo, stopped output, resumed result)."""
    repo = copy_repo(pristine_pipeline_repo, tmp_path_factory.mktemp("finetune") / "repo")
    with watched(
        ["mockingjay", "finetune", *OUTPUTS], repo, env={"TQDM_MININTERVAL": "0"}
    ) as first:
        first.wait_for(lambda: progress_step(first, 8) >= 2)
        status = stop(first)
    resumed = run(["mockingjay", "finetune", *OUTPUTS], repo)
    return repo, status, first.output, resumed


def test_stopped_and_resumed_finetune_gives_the_metrics_of_the_uninterrupted_run(finetuned):
    repo, status, stopped_output, resumed = finetuned
    assert status == 128 + signal.SIGTERM, stopped_output[-3000:]
    stopped = re.search(r"finetune stopped in (\S+) at step (\d+)", stopped_output)
    assert stopped and stopped.group(1) == "phone/finetuned", stopped_output[-3000:]
    step = int(stopped.group(2))
    assert 2 <= step < 8 and "Traceback" not in stopped_output
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"phone/finetuned: resumed at step {step}" in resumed.stderr
    # bitwise on CPU: the interrupted run ends where `dvc repro` (never interrupted) ended
    assert json.loads((repo / "metrics/ft.json").read_text()) == json.loads(
        (repo / "metrics/finetune.json").read_text()
    )
    assert (repo / "plots/ft.tsv").read_text() == (repo / "plots/finetune_accuracy.tsv").read_text()
    statuses = sorted(
        r.info.status
        for r in mlflow_runs(repo)
        if r.data.tags.get("mockingjay.stage") == "finetune" and "finetune.task" not in r.data.tags
    )
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]  # dvc repro's, the stopped, the resumed


def test_finetune_writes_a_model_per_run_metrics_plots_and_a_report(finetuned):
    repo = finetuned[0]
    metrics = json.loads((repo / "metrics/ft.json").read_text())
    assert set(metrics) == {"phone", "speaker"}
    for task in metrics:
        for variant in ("finetuned", "frozen", "scratch", "logmel"):
            entry = metrics[task][variant]["1"]
            assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["macro_f1"] <= 1.0
            assert (repo / "models/ft" / task / variant / "model.safetensors").is_file()
    results = json.loads((repo / "reports/ft/results.json").read_text())
    phone = results["phone/finetuned@1"]
    assert len(phone["confusion"]) == len(phone["classes"]) == 40
    assert sum(map(sum, phone["confusion"])) == phone["test"]["examples"] > 0
    assert {p.name for p in (repo / "reports/ft").glob("*.png")} == {
        "accuracy_by_label_fraction.png",
        "confusion_phone.png",
        "confusion_speaker.png",
    }
    header = (repo / "plots/ft.tsv").read_text().splitlines()[0].split("\t")
    assert header[0] == "label_fraction" and "phone_finetuned" in header
    children = [r for r in mlflow_runs(repo) if r.data.tags.get("finetune.task") == "phone"]
    assert {r.data.tags["finetune.variant"] for r in children} >= {"finetuned", "logmel"}
    assert all("test_accuracy" in r.data.metrics for r in children if r.info.status == "FINISHED")


def test_a_finetuned_model_is_read_by_the_online_probe_and_by_export(finetuned):
    repo = finetuned[0]
    model = repo / "models/ft/phone/finetuned"
    probe = run(["mockingjay", "probe", "--checkpoint", str(model), "--layer", "2"], repo)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert re.search(r"\d+\.\d+%", probe.stdout), probe.stdout
    exported = run(["mockingjay", "export-checkpoint", str(model), "ft.ckpt"], repo)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "no SpecHead" in exported.stderr + exported.stdout
    back = torch.load(repo / "ft.ckpt", weights_only=True)
    assert "SpecHead" not in back
    imported = run(["mockingjay", "import-checkpoint", "ft.ckpt", "models/ft-imported"], repo)
    assert imported.returncode == 0, imported.stderr[-3000:]
    ours, _ = load_encoder_dir(model)
    theirs, _ = load_encoder_dir(repo / "models/ft-imported")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    # the encoder moved away from the pretrained one it started from
    pretrained, _ = load_encoder_dir(repo / "models/pretrain/model")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(ours.state_dict().values(), pretrained.state_dict().values())
    )
