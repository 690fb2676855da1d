"""Reliability, end to end (RELIABILITY.md): SIGKILL of `dvc repro` in the middle of a stage, a
second pipeline run from scratch (identical metrics, nothing written outside the declared outputs
and the MLflow store), and two DVC experiments run in parallel by `dvc queue`.

Everything runs for real: the `dvc` and `mockingjay` commands as subprocesses on the fixture audio,
killed with SIGKILL (the whole process group, as the OOM killer or a lost machine would), and the
MLflow SQLite store read back with MLflow's client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from .conftest import (
    PARAMS,
    TINY_PIPELINE,
    cli_env,
    copy_repo,
    cpu_ticks,
    file_stats,
    make_repo,
    mlflow_runs,
    process_group,
    run,
    wait_while_progressing,
)

pytestmark = pytest.mark.slow

# Wall-clock fields of the metrics files: they differ between any two runs and are not compared.
# facts of one run, not of the result: a resumed run reports only its own part
TIMING_KEYS = {
    "seconds",
    "real_time_factor",
    "audio_seconds_per_second",
    "train_seconds",
    "audio_hours_seen",
}


class Watched:
    """A command in its own process group whose merged stdout/stderr is collected while it runs."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(1 << 16), b""):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    @property
    def tail(self) -> str:
        """The last few KiB of the output: what a condition polled every few ms reads (the whole
        output of a progress bar that reports every step grows large)."""
        chunks, size = [], 0
        for chunk in reversed(self.chunks[-64:]):
            chunks.append(chunk)
            size += len(chunk)
            if size >= 4096:
                break
        return b"".join(reversed(chunks)).decode(errors="replace")

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Poll until `condition()`; fails if the command ends first (it finished before the kill),
        or if it stalls: neither prints nor uses CPU time for conftest.STALLED_AFTER seconds."""

        def done() -> bool:
            if condition():
                return True
            ended = self.proc.poll()
            assert ended is None, f"ended (status {ended}) before the kill:\n{self.output[-3000:]}"
            return False

        wait_while_progressing(
            done,
            lambda: (sum(map(len, self.chunks)), cpu_ticks(process_group(self.proc.pid))),
            lambda: self.output[-3000:],
        )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(10)


def processes_in(repo: Path, timeout: float = 10) -> list[int]:
    """Processes whose working directory is inside `repo` (a killed stage must leave none behind),
    after giving the killed ones `timeout` seconds to go."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if Path(os.readlink(proc / "cwd")).is_relative_to(repo):
                    found.append(int(proc.name))
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def lock_hashes(repo: Path) -> dict[str, str]:
    """Output path -> md5 from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def fresh_copy(source: Path, dest: Path, never_ran: str | None = None) -> Path:
    """A copy of a finished pipeline without DVC's run cache, and with no record in dvc.lock of stage
    `never_ran`: as if it had never completed, so DVC must run it (it would otherwise check its
    last complete outputs out of the DVC cache, which is also safe but not what is tested here)."""
    repo = copy_repo(source, dest)
    shutil.rmtree(repo / ".dvc" / "cache" / "runs", ignore_errors=True)
    if never_ran:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        del lock["stages"][never_ran]
        (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return repo


# -- faults ------------------------------------------------------------------------------------------


def test_pretrain_killed_at_a_random_step_resumes_and_ends_as_the_uninterrupted_run(
    pristine_pipeline_repo, tmp_path
):
    train = TINY_PIPELINE["pretrain"]["train"]
    total, every = train["total_steps"], train["checkpoint_every"]
    seed = int(os.environ.get("MOCKINGJAY_KILL_SEED") or random.SystemRandom().randrange(1 << 31))
    kill_step = random.Random(seed).randint(every + 1, total - 1)  # past the first checkpoint
    print(
        f"SIGKILL once pretrain reaches step {kill_step} of {total} (MOCKINGJAY_KILL_SEED={seed} repeats this)"
    )
    # never_ran: otherwise DVC would complete the killed rerun by checking the earlier model out of
    # its cache (safe too), and the resume from the checkpoints would not be tested
    repo = fresh_copy(pristine_pipeline_repo, tmp_path / "repo", never_ran="pretrain")
    reference = json.loads((repo / "metrics/pretrain.json").read_text())
    reference_weights = (repo / "models/pretrain/model/model.safetensors").read_bytes()
    reference_lock = lock_hashes(pristine_pipeline_repo)["models/pretrain"]
    shutil.rmtree(repo / "models/checkpoints")
    before = {r.info.run_id for r in mlflow_runs(repo)}

    # TQDM_MININTERVAL=0: the progress bar reports every step (the CLI sets 10 s when not on a terminal).
    killed = Watched(["dvc", "repro", "-f", "-s", "pretrain"], repo, env={"TQDM_MININTERVAL": "0"})

    def step() -> int:
        found = re.findall(rf"(\d+)/{total} \[", killed.tail)
        return int(found[-1]) if found else 0

    killed.wait_for(lambda: step() >= kill_step)
    killed.kill()
    print(f"killed at step {step()}")
    assert not processes_in(repo)
    assert not (repo / "models/pretrain/model").exists(), "the final model appeared before the kill"
    state = next(
        (repo / "models/checkpoints").glob("config-*")
    )  # the one configuration's resume state
    complete = sorted(int(p.name.split("-")[1]) for p in state.glob("step-*"))
    assert complete and complete[-1] <= step(), complete

    status = run(["dvc", "status", "pretrain"], repo)
    assert "pretrain" in status.stdout and "up to date" not in status.stdout, status.stdout

    resumed = run(["dvc", "repro", "pretrain"], repo)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Running stage 'pretrain'" in resumed.stdout
    assert (
        f"resumed at step {complete[-1]} from models/checkpoints/{state.name}/step-{complete[-1]:06d}"
        in resumed.stderr
    )
    metrics = json.loads((repo / "metrics/pretrain.json").read_text())
    assert metrics["steps"] == total
    assert without_timing(metrics) == without_timing(
        reference
    )  # held-out and final losses, bit for bit
    assert (repo / "models/pretrain/model/model.safetensors").read_bytes() == reference_weights
    assert lock_hashes(repo)["models/pretrain"] == reference_lock
    # the loss plot spans the whole run: the steps logged before the kill (kept) and after it, none twice
    plot = (repo / "plots/pretrain_loss.tsv").read_text().splitlines()
    assert plot[0].split("\t")[:2] == ["step", "loss"]
    assert [int(line.split("\t")[0]) for line in plot[1:]] == list(
        range(train["log_every"], total + 1, train["log_every"])
    )
    assert len(list(state.glob("step-*"))) <= train["keep_checkpoints"]

    # MLflow: the killed run and the one that finished it; the second logged only the steps it trained
    new = [
        r
        for r in mlflow_runs(repo)
        if r.data.tags.get("mockingjay.stage") == "pretrain" and r.info.run_id not in before
    ]
    (done,) = [r for r in new if r.info.status == "FINISHED"]
    assert done.data.tags["resumed_from"].endswith(f"step-{complete[-1]:06d}")
    assert (
        done.data.params["model.hidden_size"] == "32"
        and done.data.params["train.learning_rate"] == "0.002"
    )
    for key in (
        "loss",
        "learning_rate",
        "grad_norm",
        "audio_seconds_per_second",
        "heldout_loss_final",
    ):
        assert key in done.data.metrics, key
    assert any(k.startswith("system/") for k in done.data.metrics), "system metrics were not logged"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    history = client.get_metric_history(done.info.run_id, "loss")
    assert history and all(h.step > complete[-1] for h in history)
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert {"reconstruction.png", "loss_curve.png", "config.json"} <= artifacts


def newer(path: Path) -> Callable[[], bool]:
    """True once `path` is replaced by a new file (DVC deletes a stage's outputs before running it)."""
    old = path.stat().st_ino if path.exists() else None
    return lambda: path.exists() and path.stat().st_ino != old


def has_data(folder: Path) -> Callable[[], bool]:
    return lambda: (
        folder.is_dir() and any(p.is_file() and p.stat().st_size for p in folder.rglob("*"))
    )


# stage -> (its output folder, when it is known to be in the middle of writing its outputs)
MID_OUTPUT = {
    "featurize": ("data/features", lambda repo: has_data(repo / "data/.features.partial")),
    "extract": (
        "data/representations",
        lambda repo: has_data(repo / "data/.representations.partial"),
    ),
    # the metrics file is written after the probes are trained, the report folder after it
    "probe": ("reports/probe", lambda repo: newer(repo / "metrics/probe.json")),
}


@pytest.mark.parametrize("stage", list(MID_OUTPUT))
def test_stage_killed_mid_output_is_redone_and_never_taken_as_done(
    pristine_pipeline_repo, tmp_path, stage
):
    out, writing = MID_OUTPUT[stage]
    repo = fresh_copy(pristine_pipeline_repo, tmp_path / "repo", never_ran=stage)
    reference = digests(repo / out)
    reference_files = {
        p: (repo / p).read_bytes() for p in ("metrics/probe.json", "plots/probe_accuracy.tsv")
    }

    in_the_middle = writing(repo)
    killed = Watched(["dvc", "repro", "-s", stage], repo)
    killed.wait_for(in_the_middle)
    killed.kill()
    assert not processes_in(repo)
    assert not (repo / out).exists(), (
        f"{out} exists after the kill: a half-written output in the final place"
    )

    status = run(["dvc", "status", stage], repo)
    assert f"{stage}:" in status.stdout and "up to date" not in status.stdout, (
        status.stdout
    )  # not taken as done

    redone = run(["dvc", "repro", stage], repo)
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-3000:]
    assert f"Running stage '{stage}'" in redone.stdout
    assert not [str(p) for p in repo.glob("*/.*.partial")], "a partial folder was left behind"
    again = digests(repo / out)
    assert set(again) == set(reference)
    if (
        stage == "probe"
    ):  # results.json holds the probes' wall-clock seconds; compare what they found
        before = json.loads(reference_files["metrics/probe.json"])
        assert json.loads((repo / "metrics/probe.json").read_bytes()) == before
        assert (repo / "plots/probe_accuracy.tsv").read_bytes() == reference_files[
            "plots/probe_accuracy.tsv"
        ]
        results = json.loads((repo / out / "results.json").read_text())
        for task, layers in before.items():
            for name, row in layers.items():
                assert round(results[task]["layers"][name]["accuracy"], 4) == row["accuracy"]
        assert (repo / out / "probe_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # every file byte for byte, summary.json included (it holds no wall-clock fields)
        assert again == reference


# -- a second run from scratch: determinism and where the stages write ---------------------------------


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def scratch(tmp_path_factory):
    """The pipeline of `pristine_pipeline_repo` (same params) run again from scratch in a new
    repository, with HOME, the XDG folders, TMPDIR and DVC's site cache pointed at empty folders."""
    root = tmp_path_factory.mktemp("scratch")
    repo = make_repo(root / "repo", {**PARAMS, **TINY_PIPELINE})
    home, tmp, site = root / "home", root / "tmp", root / "dvc-site-cache"
    for folder in (home, tmp, site):
        folder.mkdir()
    assert run(["dvc", "config", "--local", "core.site_cache_dir", str(site)], repo).returncode == 0
    before = file_stats(repo)
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "TMPDIR": str(tmp),
    }
    result = run(["dvc", "repro"], repo, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {"repo": repo, "before": before, "after": file_stats(repo), "home": home, "tmp": tmp}


@pytest.mark.xdist_group("scratch")  # one worker builds the module fixture `scratch`
def test_two_runs_from_scratch_give_identical_metrics(scratch, pristine_pipeline_repo):
    first, second = pristine_pipeline_repo, scratch["repo"]
    names = sorted(p.name for p in (first / "metrics").glob("*.json"))
    assert names == [
        "align.json",
        "featurize.json",
        "finetune.json",
        "prepare.json",
        "pretrain.json",
        "probe.json",
    ]
    assert sorted(p.name for p in (second / "metrics").glob("*.json")) == names
    for name in names:
        a, b = (json.loads((repo / "metrics" / name).read_text()) for repo in (first, second))
        assert without_timing(a) == without_timing(b), name  # exact equality, floats included
    for plot in ("pretrain_loss.tsv", "probe_accuracy.tsv", "finetune_accuracy.tsv"):
        assert (first / "plots" / plot).read_bytes() == (second / "plots" / plot).read_bytes(), plot
    for model in (
        "models/pretrain/model/model.safetensors",
        "models/finetune/phone/finetuned/model.safetensors",
    ):
        assert (first / model).read_bytes() == (second / model).read_bytes(), model
    locks = lock_hashes(first), lock_hashes(second)
    for out in ("data/prepared", "data/alignments"):
        assert locks[0][out] == locks[1][out], out


def declared_outputs(dvc_yaml: Path) -> tuple[list[str], list[str]]:
    """(every output path of every stage, the cached ones: DVC lists those in a .gitignore)."""
    everything, cached = [], []
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                everything.append(path)
                if options.get("cache", True):
                    cached.append(path)
    return everything, cached


@pytest.mark.xdist_group("scratch")  # one worker builds the module fixture `scratch`
def test_pipeline_writes_only_its_declared_outputs_and_the_mlflow_store(scratch):
    repo, before, after = scratch["repo"], scratch["before"], scratch["after"]
    outputs, cached = declared_outputs(repo / "dvc.yaml")
    allowed = [
        *outputs,
        "mlflow.db",
        "mlartifacts",  # the MLflow store (runs, artifacts)
        "models/checkpoints",  # pretrain's resume state: git-ignored, deliberately not a DVC output
        "models/finetune_checkpoints",  # finetune's, likewise
        "dvc.lock",
        ".dvc/cache",
        ".dvc/tmp",  # DVC's own records
        *sorted({str(Path(p).parent / ".gitignore") for p in cached}),
    ]  # DVC's ignore entries

    def is_allowed(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in allowed)

    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed, "nothing was written"
    assert sorted(p for p in changed if not is_allowed(p)) == []
    for out in outputs:
        assert (repo / out).exists(), out
    assert (
        sum(p.startswith("mlartifacts/") for p in changed) > 0
    )  # artifacts went to the repository's store
    assert "models/checkpoints" not in outputs and any(
        p.startswith("models/checkpoints/config-") for p in changed
    )
    ignored = run(["git", "check-ignore", "-q", "models/checkpoints/train_log.jsonl"], repo)
    assert ignored.returncode == 0, "the resume state must be git-ignored"

    # Outside the repository: only third-party caches in HOME, nothing in TMPDIR.
    home_files = sorted(
        str(p.relative_to(scratch["home"])) for p in scratch["home"].rglob("*") if p.is_file()
    )
    expected_home = [
        r"\.cache/matplotlib/fontlist-v[\d.]+\.json",  # matplotlib's font list cache
        r"\.config/mlflow/telemetry\.json",
    ]  # MLflow 3's installation id (telemetry)
    assert [f for f in home_files if not any(re.fullmatch(e, f) for e in expected_home)] == []
    tmp_entries = sorted(str(p.relative_to(scratch["tmp"])) for p in scratch["tmp"].rglob("*"))
    # torch creates an empty torchinductor_<user> folder when it is imported; no file is left
    assert [e for e in tmp_entries if not re.fullmatch(r"torchinductor_\w+", e)] == []


# -- concurrency ---------------------------------------------------------------------------------------


def test_queued_experiments_run_in_parallel_land_in_mlflow_and_reuse_unchanged_stages(
    pristine_pipeline_repo, tmp_path
):
    repo = copy_repo(pristine_pipeline_repo, tmp_path / "repo")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline: the finished pipeline"]):
        result = run(cmd, repo)
        assert result.returncode == 0, result.stderr
    before = {r.info.run_id for r in mlflow_runs(repo)}
    # pretrain, extract, probe and finetune rerun in par-a and par-b (a few steps and a smaller probe keep it
    # short); probe-only changes only probe params, so its temporary copy must take the model and the
    # representations from the DVC cache instead of computing them again.
    experiments = {"par-a": 3, "par-b": 4, "probe-only": None}
    for name, steps in experiments.items():
        pretrain_change = ["-S", f"pretrain.train.total_steps={steps}"] if steps else []
        queued = run(
            [
                "dvc",
                "exp",
                "run",
                "--queue",
                "-n",
                name,
                *pretrain_change,
                "-S",
                "probe.phone.epochs=2",
                "-S",
                "probe.speaker.epochs=20",
            ],
            repo,
        )
        assert queued.returncode == 0, queued.stderr
    # One worker per experiment (-j 3): a DVC queue worker runs one experiment at a time, so with
    # -j 2 the third waited in the queue until a worker was free, and then depended on DVC's idle
    # monitor not retiring the workers meanwhile (every 10 s each worker asks itself, over the
    # filesystem broker with a 1 s timeout, whether it is busy, and falls back to the queue's
    # contents when a loaded machine answers late). With a worker each, nothing waits in the queue.
    # The celery workers that `dvc queue start` daemonises inherit its stdout: read through a pipe,
    # a worker that hangs in its own shutdown after its last task (seen once in CI) would block the
    # test, so the output goes to a file and the workers are stopped at the end whatever happens.
    with open(tmp_path / "queue-start.log", "w") as log:
        starter = subprocess.Popen(
            ["dvc", "queue", "start", "-j", str(len(experiments))],
            cwd=repo,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        status = wait_for_queue(repo, starter, tmp_path / "queue-start.log")
    finally:
        stop_queue_workers(repo, starter)
    assert starter.returncode in (0, -signal.SIGKILL), (tmp_path / "queue-start.log").read_text()
    logs = {name: run(["dvc", "queue", "logs", name], repo).stdout for name in experiments}
    for name in experiments:
        assert re.search(rf"\b{name}\s+.*\bSuccess\b", status), status
        assert "database is locked" not in logs[name] and "Traceback" not in logs[name], logs[name][
            -3000:
        ]
    shown = run(["dvc", "exp", "show", "--json"], repo)
    assert all(name in shown.stdout for name in experiments)

    new = [r for r in mlflow_runs(repo) if r.info.run_id not in before]
    assert all(r.info.status == "FINISHED" for r in new), [
        (r.info.run_name, r.info.status) for r in new
    ]
    own_store = (
        repo / "mlartifacts"
    ).as_uri() + "/"  # the copy's store, not its source's (copy_repo)
    assert all(r.info.artifact_uri.startswith(own_store) for r in new), {
        r.info.artifact_uri for r in new
    }
    spans = {}
    for name, steps in experiments.items():
        tagged = [r for r in new if r.data.tags.get("dvc_exp_name") == name]
        if steps is None:  # a stage DVC skips makes no MLflow run
            assert sorted(r.data.tags["mockingjay.stage"] for r in tagged) == ["probe"], name
            for stage in ("pretrain", "extract"):
                assert f"Stage '{stage}' didn't change, skipping" in logs[name], logs[name][-3000:]
            continue
        assert sorted(r.data.tags["mockingjay.stage"] for r in tagged) == [
            "extract",
            "finetune",
            "pretrain",
            "probe",
        ], name
        pretrain = next(r for r in tagged if r.data.tags["mockingjay.stage"] == "pretrain")
        assert pretrain.data.params["train.total_steps"] == str(steps)
        probe = next(r for r in tagged if r.data.tags["mockingjay.stage"] == "probe")
        children = [r for r in new if r.data.tags.get("mlflow.parentRunId") == probe.info.run_id]
        assert len(children) == 8, (name, len(children))  # 2 tasks x (input + 3 hidden states)
        finetune = next(r for r in tagged if r.data.tags["mockingjay.stage"] == "finetune")
        runs = [r for r in new if r.data.tags.get("mlflow.parentRunId") == finetune.info.run_id]
        assert len(runs) == 8, (name, len(runs))  # 2 tasks x 4 variants
        spans[name] = (min(r.info.start_time for r in tagged), max(r.info.end_time for r in tagged))
    assert len(new) == 2 * (4 + 8 + 8) + (1 + 8), "a run was lost or duplicated"
    (a_start, a_end), (b_start, b_end) = spans["par-a"], spans["par-b"]
    assert a_start < b_end and b_start < a_end, f"the experiments did not overlap in time: {spans}"


def queue_processes(repo: Path) -> dict[int, bytes]:
    """pid -> command line of the processes working in `repo` (queue workers, `dvc exp exec-run`
    and the stages they run)."""
    return {
        pid: cmdline
        for pid in processes_in(repo, timeout=0)
        if (cmdline := _cmdline(pid)) is not None
    }


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def wait_for_queue(repo: Path, starter: subprocess.Popen, start_log: Path) -> str:
    """Wait until `dvc queue status` shows no task Queued or Running; returns that status.

    Waits as long as the experiments make progress (their processes use CPU time, their logs grow,
    the status changes). `dvc queue status` is itself a DVC process (seconds of CPU time on a busy
    machine), so it is asked only when no experiment process is running (one just ended) or every
    30 s. A task still `Queued` once `dvc queue start` has finished and no worker is alive would
    never run: that fails at once, with the worker logs."""
    seen = {"status": "", "asked": 0.0}

    def status() -> str:
        seen["status"], seen["asked"] = (
            run(["dvc", "queue", "status"], repo).stdout,
            time.monotonic(),
        )
        return seen["status"]

    def logs() -> str:
        files = sorted((repo / ".dvc/tmp/exps").rglob("*.out"))
        return "\n".join(
            f"== {f.relative_to(repo)}\n{f.read_text(errors='replace')[-2000:]}" for f in files
        )

    def done() -> bool:
        processes = queue_processes(repo)
        running = any(b"exec-run" in cmdline for cmdline in processes.values())
        if time.monotonic() - seen["asked"] < (30 if running else 2):
            return False
        if not re.search(r"\b(Queued|Running)\b", status()):
            return True
        workers = [
            pid for pid, cmdline in queue_processes(repo).items() if b"queue-worker" in cmdline
        ]
        if starter.poll() is not None and not workers and re.search(r"\bQueued\b", seen["status"]):
            pytest.fail(
                f"a task is Queued and no queue worker is alive:\n{seen['status']}\n"
                f"dvc queue start:\n{start_log.read_text()}\n{logs()}"
            )
        return False

    def progress():
        outputs = sorted(
            (str(f), f.stat().st_size) for f in (repo / ".dvc/tmp/exps").rglob("*.out")
        )
        return cpu_ticks(queue_processes(repo)), outputs, seen["status"]

    wait_while_progressing(done, progress, lambda: f"{seen['status']}\n{logs()}", poll=0.5)
    return seen["status"]


def stop_queue_workers(repo: Path, starter: subprocess.Popen) -> None:
    """Kill what `dvc queue start` left running: its celery workers and itself."""
    for pid, cmdline in queue_processes(repo).items():
        if b"queue-worker" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    try:
        starter.wait(timeout=30)
    except subprocess.TimeoutExpired:
        starter.kill()
        starter.wait()
