"""MLflow tracking for the stages: one run per stage execution, in one store per repository.

DVC experiments run in temporary copies of the repository (`.dvc/tmp/exps/...`), so a
relative `sqlite:///mlflow.db` would scatter runs across throw-away folders. The store is
therefore always an absolute path at the root of the *original* repository, unless
`MLFLOW_TRACKING_URI` says otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import logging
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
            ["git", "rev-parse", "--show-toplevel"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
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
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path.cwd(),
            capture_output=True,
            text=True,
            check=True,
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
            experiment_id = mlflow.create_experiment(
                EXPERIMENT_NAME, artifact_location=artifact_location
            )
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
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


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
        raise TrackingError(
            f"relocate-artifacts works on a local store; {uri} is not one (unset MLFLOW_TRACKING_URI?)"
        )
    new = (store.parent / "mlartifacts").as_uri()
    with _contextlib.closing(sqlite3.connect(store)) as db, db:
        found = db.execute(
            "SELECT experiment_id, artifact_location FROM experiments WHERE name = ?",
            (EXPERIMENT_NAME,),
        ).fetchone()
        if found is None or found[1] == new:
            print(
                f"relocate-artifacts: nothing to do; experiment {EXPERIMENT_NAME!r} in {store} "
                f"{'does not exist yet' if found is None else 'already keeps its artifacts in ' + new}",
                file=sys.stderr,
            )
            return
        experiment_id, old = found
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (new, experiment_id),
        )
        # the runs' artifact URIs start with the old location: repoint their prefix only
        db.execute(
            "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
            "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
            (new, len(old) + 1, experiment_id, len(old), old),
        )
    print(f"relocate-artifacts: experiment {EXPERIMENT_NAME!r}: {old} -> {new}", file=sys.stderr)


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], run_name: str | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Start an MLflow run for one stage execution, tagged for DVC experiments and git.

    Yields the `mlflow` module behind a `Tracker`: once the run has started, a failing store never
    stops the stage (see `Tracker`). The run ends FAILED if the body raises, KILLED on a stop signal.
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
    tracker = Tracker(mlflow, tracking_uri(), stage)
    try:
        log_params(tracker, params)
        yield tracker
        tracker.log_metric("duration_sec", round(time.time() - started, 3))
    except BaseException as err:
        # KILLED for a stop signal, so a preempted job is not left RUNNING or taken for a crash;
        # every run still open (a probe's child run, then the stage's) is ended.
        _end_runs_down_to(
            tracker,
            run,
            "KILLED" if isinstance(err, (StageInterrupted, KeyboardInterrupt)) else "FAILED",
        )
        raise
    else:
        _end_runs_down_to(tracker, run, "FINISHED")
    finally:
        tracker.restore_loggers()
    if tracker.error is None:
        print(f"mlflow: logged run {run.info.run_id} ({name}) to {tracking_uri()}", file=sys.stderr)
    else:
        tracker.fail_at_exit(run.info.run_id)


def _end_runs_down_to(mlflow, run, status: str) -> None:
    """End the active runs opened inside `run` (a probe's child run), then `run` itself."""
    while (active := mlflow.active_run()) is not None:
        mlflow.end_run(status)
        if active.info.run_id == run.info.run_id:
            return


# MLflow's own loggers that report a failing store (with a traceback, every 2 s for system metrics);
# the Tracker reports that failure once, in one line, so they are quietened while a run is open.
_STORE_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics", "mlflow.utils.async_logging")


# mlflow functions that only read this process's state, never the store: always answered.
_LOCAL = frozenset({"active_run", "last_active_run", "get_tracking_uri"})


class Tracker:
    """The `mlflow` module as a stage uses it inside its run, where tracking must never cost the
    stage its work (a user deleted `mlflow.db` mid-training and lost the run to a traceback).

    Every call goes to mlflow. The first one that raises is reported in one warning line naming the
    store and the error; from then on every call is skipped and counted, the stage finishes its own
    outputs, and `fail_at_exit` makes the command exit 1 at the end, saying what was not logged.
    """

    def __init__(self, mlflow, uri: str, stage: str):
        self._mlflow, self._uri, self._stage = mlflow, uri, stage
        self.error: BaseException | None = None
        self.skipped: collections.Counter = collections.Counter()
        self._quietened = {name: logging.getLogger(name).level for name in _STORE_LOGGERS}
        for name in _STORE_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def __getattr__(self, name: str):
        attr = getattr(self._mlflow, name)
        if not callable(attr) or name in _LOCAL:
            return attr

        def call(*args, **kwargs):
            if self.error is None:
                try:
                    result = attr(*args, **kwargs)
                    return _ChildRun(self, result) if name == "start_run" else result
                except Exception as err:  # noqa: BLE001 - any store failure: report once, go on
                    self._failed(err)
            if (
                name == "end_run"
            ):  # still pop mlflow's local run stack, so a later run in this process starts clean
                with contextlib.suppress(Exception):
                    attr(*args, **kwargs)
                return None
            self.skipped[name] += 1
            return contextlib.nullcontext() if name == "start_run" else None

        return call

    def _failed(self, err: BaseException) -> None:
        from tqdm import tqdm

        self.error = err
        with tqdm.external_write_mode(
            file=sys.stderr
        ):  # a line of its own, not the end of a progress bar's
            print(
                f"warning: mlflow: tracking to {self._uri} failed ({_root_cause(err)}); {self._stage} goes on "
                "without tracking and will exit 1 at the end",
                file=sys.stderr,
            )

    def fail_at_exit(self, run_id: str) -> None:
        """Make the command exit 1 once the stage is done (common.cli_errors), naming what was lost."""
        from .common import fail_at_exit

        lost = (
            ", ".join(f"{n} {name}" for name, n in sorted(self.skipped.items()))
            or "the end of the run"
        )
        fail_at_exit(
            f"mlflow: tracking to {self._uri} failed during the {self._stage} run ({_root_cause(self.error)}); "
            f"not logged: {lost}. The stage's outputs are complete; its MLflow run {run_id} is incomplete "
            "(fix the store, then rerun the stage to record it)"
        )

    def restore_loggers(self) -> None:
        """After a failure they stay quiet: mlflow's system-metrics thread and its exit handler would
        still report the broken store, with tracebacks, after the one warning."""
        if self.error is not None:
            return
        for name, level in self._quietened.items():
            logging.getLogger(name).setLevel(level)


class _ChildRun:
    """A nested run (probe's per-layer runs) ended through its Tracker, so that ending it cannot raise."""

    def __init__(self, tracker: Tracker, active):
        self._tracker, self._active = tracker, active

    def __enter__(self):
        return self._active

    def __exit__(self, kind, value, traceback):
        if self._tracker.active_run() is not None:
            self._tracker.end_run("FINISHED" if kind is None else "FAILED")
        return False


def _root_cause(err: BaseException) -> str:
    """The innermost exception's type and first line: `OperationalError: attempt to write a readonly
    database`, not SQLAlchemy's paragraph around it."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def log_params(mlflow, params: dict[str, Any]) -> None:
    """Log flat params in batches; values longer than MLflow's limit are truncated visibly."""
    items = [
        (k, str(v) if len(str(v)) <= 6000 else str(v)[:5990] + "...") for k, v in params.items()
    ]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))
