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
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow


class TrackingError(RuntimeError):
    pass


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], run_name: str | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Start an MLflow run for one stage execution, tagged for DVC experiments and git.

    Yields the `mlflow` module; the run ends FAILED if the body raises.
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
    with mlflow.start_run(run_name=name, tags=tags, log_system_metrics=system_metrics) as run:
        log_params(mlflow, params)
        yield mlflow
        mlflow.log_metric("duration_sec", round(time.time() - started, 3))
    print(f"mlflow: logged run {run.info.run_id} ({name}) to {tracking_uri()}", file=sys.stderr)


def log_params(mlflow, params: dict[str, Any]) -> None:
    """Log flat params in batches; values longer than MLflow's limit are truncated visibly."""
    items = [(k, str(v) if len(str(v)) <= 6000 else str(v)[:5990] + "...") for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))
