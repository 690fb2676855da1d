"""MLflow tracking for the stages: one run per stage execution, in one store per repository.

DVC experiments run in temporary copies of the repository (`.dvc/tmp/exps/...`), so a
relative `sqlite:///mlflow.db` would scatter runs across throw-away folders. The store is
therefore always an absolute path at the root of the *original* repository, unless
`MLFLOW_TRACKING_URI` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

EXPERIMENT_NAME = os.environ.get("MOCKINGJAY_EXPERIMENT", "mockingjay")
_DVC_TEMP_MARKER = os.sep + os.path.join(".dvc", "tmp") + os.sep


def repo_root(start: Path | None = None) -> Path:
    """The repository the user works in, also when called inside a DVC temporary copy."""
    here = (start or Path.cwd()).resolve()
    text = str(here) + os.sep
    if _DVC_TEMP_MARKER in text:
        return Path(text.split(_DVC_TEMP_MARKER, 1)[0])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(top)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return here


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path.cwd(), capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after MLflow's minutes of HTTP retries, when a tracking server is down."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it, fix MLFLOW_TRACKING_URI, "
            "or unset it to use the local store sqlite:///<repo>/mlflow.db. Nothing was run."
        ) from err


def _configure():
    import logging

    # MLflow's alembic migrations log at INFO on the first use of a new store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                artifact_location = (repo_root() / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable ({type(err).__name__}: {err}). "
            "Fix or unset MLFLOW_TRACKING_URI (default: sqlite:///<repo>/mlflow.db)."
        ) from err
    if experiment is not None:
        check_artifact_location(uri, experiment.artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow


class TrackingError(RuntimeError):
    pass


def _local_store(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_artifact_location(uri: str, location: str) -> None:
    """A local store's artifacts go to the `mlartifacts/` beside it. MLflow records that folder as
    an absolute path, so in a copied repository (`cp -a`) it still names the original's: refuse
    then, before any work, rather than write into another repository."""
    from urllib.parse import unquote, urlparse

    store = _local_store(uri)
    parsed = urlparse(location or "")
    if store is None or parsed.scheme not in ("", "file"):
        return  # a server's or a remote store's artifact location is theirs to choose
    wanted = store.parent / "mlartifacts"
    if Path(os.path.realpath(unquote(parsed.path))) == Path(os.path.realpath(wanted)):
        return
    raise TrackingError(
        f"MLflow experiment {EXPERIMENT_NAME!r} in {store} keeps its artifacts in {unquote(parsed.path)}, not beside "
        f"the store in {wanted}: the repository was probably copied from another one, whose artifacts new runs "
        f"would change. Run `mockingjay relocate-artifacts` here to point this store at {wanted} (copy the old "
        "folder's content there first if the earlier runs' artifacts should stay viewable), or set "
        "MLFLOW_TRACKING_URI to the store you mean. Nothing was run."
    )


def relocate_artifacts_main() -> None:
    """Point this repository's MLflow store (mlflow.db) at the mlartifacts/ beside it, e.g. after a copy."""
    import contextlib as _contextlib
    import sqlite3

    uri = tracking_uri()
    store = _local_store(uri)
    if store is None or not store.is_file():
        raise TrackingError(f"relocate-artifacts works on a local store; {uri} is not one (unset MLFLOW_TRACKING_URI?)")
    new = (store.parent / "mlartifacts").as_uri()
    with _contextlib.closing(sqlite3.connect(store)) as db, db:
        found = db.execute("SELECT experiment_id, artifact_location FROM experiments WHERE name = ?",
                           (EXPERIMENT_NAME,)).fetchone()
        if found is None or found[1] == new:
            print(f"relocate-artifacts: nothing to do; experiment {EXPERIMENT_NAME!r} in {store} "
                  f"{'does not exist yet' if found is None else 'already keeps its artifacts in ' + new}", file=sys.stderr)
            return
        experiment_id, old = found
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, experiment_id))
        # the runs' artifact URIs start with the old location: repoint their prefix only
        db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                   "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                   (new, len(old) + 1, experiment_id, len(old), old))
    print(f"relocate-artifacts: experiment {EXPERIMENT_NAME!r}: {old} -> {new}", file=sys.stderr)


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], run_name: str | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Start an MLflow run for one stage execution, tagged for DVC experiments and git.

    Yields the `mlflow` module; the run ends FAILED if the body raises, KILLED on a stop signal.
    """
    mlflow = _configure()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    commit = git_commit()
    tags = {
        "mockingjay.stage": stage,
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "mlflow.source.name": f"mockingjay {stage}",
    }
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    name = run_name or (f"{stage}:{exp_name}" if exp_name else stage)
    started = time.time()
    if system_metrics:
        # CPU/GPU/memory every 2 s, so even a short run has a curve.
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
    from .common import StageInterrupted

    run = mlflow.start_run(run_name=name, tags=tags, log_system_metrics=system_metrics)
    try:
        log_params(mlflow, params)
        yield mlflow
        mlflow.log_metric("duration_sec", round(time.time() - started, 3))
    except BaseException as err:
        # KILLED for a stop signal, so a preempted job is not left RUNNING or taken for a crash;
        # every run still open (a probe's child run, then the stage's) is ended.
        _end_runs_down_to(mlflow, run, "KILLED" if isinstance(err, (StageInterrupted, KeyboardInterrupt)) else "FAILED")
        raise
    _end_runs_down_to(mlflow, run, "FINISHED")
    print(f"mlflow: logged run {run.info.run_id} ({name}) to {tracking_uri()}", file=sys.stderr)


def _end_runs_down_to(mlflow, run, status: str) -> None:
    """End the active runs opened inside `run` (a probe's child run), then `run` itself."""
    while (active := mlflow.active_run()) is not None:
        mlflow.end_run(status)
        if active.info.run_id == run.info.run_id:
            return


def log_params(mlflow, params: dict[str, Any]) -> None:
    """Log flat params in batches; values longer than MLflow's limit are truncated visibly."""
    items = [(k, str(v) if len(str(v)) <= 6000 else str(v)[:5990] + "...") for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))
