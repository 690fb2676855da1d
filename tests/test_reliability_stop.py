"""Stopping and sharing (RELIABILITY.md): SIGTERM in the middle of a stage, two pretrain runs on one
checkpoints folder, and the resume state of earlier configurations.

Real signals sent to the `mockingjay` process (not its group: Kubernetes signals PID 1 only), on
the fixture corpus, with the MLflow store read back afterwards."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path

import pytest
import yaml

from mockingjay import resume_state

from .conftest import copy_repo, mlflow_runs, run
from .test_reliability import Watched, has_data

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
RECORDS = ["--metrics", "metrics/pretrain.json", "--plot", "plots/pretrain_loss.tsv"]


def set_train(repo: Path, **train) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"] = {**TINY, "train": {**TINY["train"], **train}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(featurized_repo, tmp_path) -> Path:
    return copy_repo(featurized_repo, tmp_path / "repo")


def progress_step(watched: Watched, total: int) -> int:
    found = re.findall(rf"(\d+)/{total} \[", watched.tail)
    return int(found[-1]) if found else 0


def stage_runs(repo: Path, stage: str) -> list:
    return [r for r in mlflow_runs(repo) if r.data.tags.get("mockingjay.stage") == stage]


def logged_steps(state: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (state / "train_log.jsonl").read_text().splitlines()
    ]


@contextlib.contextmanager
def watched(args: list[str], repo: Path, env: dict | None = None):
    """A Watched command, SIGKILLed if the test fails while it runs (so it cannot outlive the test)."""
    command = Watched(args, repo, env)
    try:
        yield command
    finally:
        if command.proc.poll() is None:
            command.kill()


def stop(command: Watched, signum: int = signal.SIGTERM) -> int:
    command.proc.send_signal(signum)
    status = command.proc.wait()
    command.reader.join(10)
    return status


# SIGTERM: what SLURM and Kubernetes send before a kill; SIGINT: Ctrl-C. Both take one path.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_mid_pretrain_checkpoints_the_step_reached_ends_the_run_killed_and_resumes(
    repo, signum
):
    total = 12
    # no regular checkpoint before the end: the one found after the signal is the signal's
    set_train(repo, total_steps=total, checkpoint_every=1000)
    # TQDM_MININTERVAL=0: the progress bar reports every step (the CLI sets 10 s when not on a terminal)
    with watched(
        ["mockingjay", "pretrain", *RECORDS], repo, env={"TQDM_MININTERVAL": "0"}
    ) as training:
        training.wait_for(lambda: progress_step(training, total) >= 3)
        sent_at = progress_step(training, total)
        assert stop(training, signum) == 128 + signum, training.output[-3000:]
    assert f"error: stopped by {signal.Signals(signum).name}" in training.output
    assert "Traceback" not in training.output and "KeyboardInterrupt" not in training.output, (
        training.output[-3000:]
    )
    stopped = re.search(
        r"pretrain stopped at step (\d+) and wrote checkpoint (\S+);", training.output
    )
    assert stopped, training.output[-3000:]
    step = int(stopped.group(1))
    assert sent_at <= step < total and "run the same command again" in training.output
    (state,) = (repo / "models/checkpoints").glob("config-*")
    assert [p.name for p in state.glob("step-*")] == [
        f"step-{step:06d}"
    ]  # the step reached, nothing else
    assert stopped.group(2) == str(Path("models/checkpoints") / state.name / f"step-{step:06d}")
    assert (
        not (repo / "models/pretrain/model").exists()
        and not (repo / "metrics/pretrain.json").exists()
    )
    (killed,) = stage_runs(repo, "pretrain")
    assert killed.info.status == "KILLED"
    if (
        signum == signal.SIGINT
    ):  # what follows the checkpoint is the same for both: resumed once, below
        return

    resumed = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed at step {step} from models/checkpoints/{state.name}/step-{step:06d}"
        in resumed.stderr
    )
    assert json.loads((repo / "metrics/pretrain.json").read_text())["steps"] == total
    assert logged_steps(state) == list(
        range(2, total + 1, 2)
    )  # the whole run's log, every step once
    assert sorted(r.info.status for r in stage_runs(repo, "pretrain")) == ["FINISHED", "KILLED"]


# stage -> (command, the folder it is writing into while it works)
WRITING = {
    "featurize": (
        ["mockingjay", "featurize", "--out", "data/features-2"],
        "data/.features-2.partial",
    ),
    "extract": (
        ["mockingjay", "extract", "--out", "data/representations-2"],
        "data/.representations-2.partial",
    ),
}


@pytest.mark.parametrize("stage", list(WRITING))
def test_sigterm_mid_output_removes_the_partial_folder_and_ends_the_run_killed(
    featurized_repo, pristine_pipeline_repo, tmp_path, stage
):
    repo = copy_repo(
        pristine_pipeline_repo if stage == "extract" else featurized_repo, tmp_path / "repo"
    )
    command, partial = WRITING[stage]
    before = {r.info.run_id for r in stage_runs(repo, stage)}
    with watched(command, repo) as working:
        working.wait_for(has_data(repo / partial))
        assert stop(working) == 128 + signal.SIGTERM, working.output[-3000:]
    assert "stopped by SIGTERM" in working.output and "Traceback" not in working.output, (
        working.output[-3000:]
    )
    assert not (repo / partial).exists() and not (repo / command[-1]).exists()
    new = [r for r in stage_runs(repo, stage) if r.info.run_id not in before]
    assert [r.info.status for r in new] == ["KILLED"]


def test_a_second_pretrain_on_one_checkpoints_folder_is_refused_naming_the_holder(repo):
    set_train(repo, total_steps=100_000, checkpoint_every=10)
    with watched(["mockingjay", "pretrain"], repo, env={"TQDM_MININTERVAL": "0"}) as first:
        first.wait_for(lambda: progress_step(first, 100_000) >= 2)
        second = run(["mockingjay", "pretrain"], repo)
        assert second.returncode == 1, second.stderr[-3000:]
        assert (
            f"models/checkpoints is in use by another run (PID {first.proc.pid})" in second.stderr
        ), second.stderr
        assert "Traceback" not in second.stderr
        seen = progress_step(first, 100_000)
        first.wait_for(
            lambda: progress_step(first, 100_000) >= seen + 4
        )  # the first run went on, undisturbed
        assert stop(first) == 128 + signal.SIGTERM, first.output[-3000:]
    (state,) = (repo / "models/checkpoints").glob("config-*")
    steps = logged_steps(state)
    assert steps == sorted(set(steps)) and steps[:3] == [
        2,
        4,
        6,
    ]  # one writer: no step twice, none out of order
    assert [r.info.status for r in stage_runs(repo, "pretrain")] == [
        "KILLED"
    ]  # the refused run started none
    with resume_state.locked(repo / "models/checkpoints"):  # the lock went with its holder
        pass


def test_trying_other_configurations_keeps_every_resume_state_until_removed(repo):
    steps = {"a": 3, "b": 4}  # each total_steps value is another configuration
    names = {}
    for label, total in steps.items():
        set_train(repo, total_steps=total, log_every=1)
        result = run(["mockingjay", "pretrain", *(RECORDS if label == "a" else [])], repo)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "starting afresh" in result.stderr
        names[label] = re.search(
            r"starting afresh in models/checkpoints/(config-\w+)", result.stderr
        ).group(1)
        if label == "a":
            metrics = json.loads((repo / "metrics/pretrain.json").read_text())
            plot = (repo / "plots/pretrain_loss.tsv").read_text()
    assert "kept the resume state of 1 other configuration(s)" in result.stderr
    assert "training.total_steps=3" in result.stderr
    set_train(
        repo, total_steps=steps["a"], log_every=1
    )  # back to the first configuration: its state is still there
    back = run(["mockingjay", "pretrain", *RECORDS], repo)
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"resumed at step 3 from models/checkpoints/{names['a']}/step-000003" in back.stderr
    # A finished run resumed at its last step (DVC reruns the stage when an upstream hash changes):
    # its outputs still report the whole run, not an empty one.
    assert "no step trained in this run" in back.stderr
    resumed = json.loads((repo / "metrics/pretrain.json").read_text())
    for key in ("steps", "heldout_loss_initial", "heldout_loss_final", "train_loss_final"):
        assert resumed[key] == metrics[key], key
    assert resumed["audio_seconds_per_second"] is None and metrics["audio_seconds_per_second"] > 0
    assert (repo / "plots/pretrain_loss.tsv").read_text() == plot

    listed = run(["mockingjay", "checkpoints", "list"], repo)
    assert listed.returncode == 0, listed.stderr
    assert sorted(re.findall(r"(config-\w+): step (\d+) of (\d+)", listed.stdout)) == sorted(
        (names[label], str(total), str(total)) for label, total in steps.items()
    )
    removed = run(["mockingjay", "checkpoints", "remove", names["b"]], repo)
    assert removed.returncode == 0, removed.stderr
    assert [p.name for p in (repo / "models/checkpoints").glob("config-*")] == [names["a"]]
    missing = run(["mockingjay", "checkpoints", "remove", names["b"]], repo)
    assert missing.returncode == 1 and f"{names['b']}: no such resume state" in missing.stderr, (
        missing.stderr
    )

    # The first configuration again, on other features of the same shape (no CMVN instead of
    # per-utterance): its state is not resumed, since the features are part of the fingerprint.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["featurize"]["cmvn"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run(["mockingjay", "featurize"], repo).returncode == 0
    other_features = run(["mockingjay", "pretrain"], repo)
    assert other_features.returncode == 0, other_features.stderr[-3000:]
    assert (
        "starting afresh" in other_features.stderr
        and "resumed at step" not in other_features.stderr
    )
    assert names["a"] not in other_features.stderr.split("starting afresh")[1].splitlines()[0]
    assert (
        len(list((repo / "models/checkpoints").glob("config-*"))) == 2
    )  # a's state is kept beside the new one
