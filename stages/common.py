"""What every stage shares: params loading, guarded atomic output folders, clear CLI errors, stop
signals, workers."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import typer

# write_json and write_text_atomically: the stages import them from here (mockingjay.atomic owns them)
from mockingjay.atomic import atomic_directory, write_json, write_text_atomically  # noqa: F401
from mockingjay.config import ParamError, load_params
from mockingjay.store_layout import feature_config_file

PARAMS_OPTION = typer.Option(
    Path("params.yaml"), "--params", help="params file to read the stage's section from"
)


class StageError(RuntimeError):
    """A stage cannot run; the message says what to fix."""


# The top-level sections of a params file: one per stage that reads one. A file passed with
# --params may hold several (DVC's params.yaml holds all, a study's file those it changes), but a
# section no stage reads is a misspelling (`pretrian:`) that would leave the stage on its defaults.
STAGE_SECTIONS = ("prepare", "align", "featurize", "pretrain", "extract", "probe", "finetune")
_params_read: list[Path] = []  # the params file this command read: named in its parameter errors


def section(params_file: Path, name: str) -> dict:
    params = load_params(params_file)
    _params_read[:] = [Path(params_file)]
    for key in params:
        if key not in STAGE_SECTIONS:
            close = difflib.get_close_matches(str(key), STAGE_SECTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ParamError(
                f"{key}: unknown section in {params_file}{hint}; the stages read only "
                f"{', '.join(STAGE_SECTIONS)}"
            )
    value = params.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamError(f"{name}: expected a mapping in {params_file}")
    return value


# The errors of bad data, by the module that raises them (module -> class name).
DATA_ERRORS = {
    "mockingjay.audio": "AudioError",
    "mockingjay.checkpoint": "CheckpointError",
    "mockingjay.corpus_spec": "CorpusError",
    "mockingjay.featstore": "StoreError",
    "mockingjay.featurize": "FeaturizeError",
    "mockingjay.resume_state": "ResumeStateError",
    "stages.tracking": "TrackingError",
}


def _loaded_data_errors() -> tuple[type, ...]:
    # Only a module already imported can have raised its error; importing the others here would
    # load torch (mockingjay.checkpoint) and make every parameter error seconds slower.
    return tuple(
        getattr(sys.modules[module], name)
        for module, name in DATA_ERRORS.items()
        if module in sys.modules
    )


class StageInterrupted(BaseException):
    """SIGTERM or SIGINT reached the stage. A BaseException, so that no `except Exception` swallows
    it: on its way out every `atomic_output_dir` removes its partial folder and `stage_run` ends the
    MLflow run KILLED."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail or f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.detail = signum, detail


# SIGTERM is what SLURM and Kubernetes send before killing a preempted job; SIGINT is Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop: dict[str, Any] = {"pid": None, "defer": False, "pending": None}


def _on_stop_signal(signum, frame) -> None:
    if os.getpid() != _stop["pid"]:
        return  # a forked worker: the stage's own process stops the pool in order
    if _stop["pending"] is not None:
        return  # already stopping: let the cleanup finish (SIGKILL still ends everything at once)
    _stop["pending"] = signum
    if _stop["defer"]:
        print(
            f"{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint",
            file=sys.stderr,
        )
        return
    raise StageInterrupted(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGINT raise StageInterrupted in the stage's process while the body runs."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _stop.update(pid=os.getpid(), defer=False, pending=None)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[Callable[[], int | None]]:
    """Inside the body a stop signal only sets a flag, which the yielded function returns (the
    signal number, or None): for a loop that must finish its step and checkpoint before it stops."""
    _stop["defer"] = True
    try:
        yield lambda: _stop["pending"]
    finally:
        _stop["defer"] = False
    if _stop["pending"] is not None:  # arrived after the loop's last look at the flag
        raise StageInterrupted(_stop["pending"])


def _with_params_file(message: str) -> str:
    """A parameter of a stage's section (`pretrain.model.x: ...`) is named with the file it is in;
    command-line options (`--layer`) are not in any file."""
    head = message.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
    if _params_read and head in STAGE_SECTIONS and str(_params_read[0]) not in message:
        return f"{message} (in {_params_read[0]})"
    return message


def _os_error_line(err: OSError) -> str:
    """`<path>: no space left on device` rather than a traceback: a read-only folder, a full disk
    or a file where a folder should be is for the user to fix. Every output is built beside its
    final place and removed on the way out, so nothing half-written is left."""
    if err.errno is None or not err.strerror:
        return str(err)  # raised by our own code with a message of its own
    where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return f"{where}: {_cause(err)}" if where else _cause(err)


def _cause(err: OSError) -> str:
    return err.strerror[0].lower() + err.strerror[1:] if err.strerror else str(err)


_at_exit: list[str] = []


def fail_at_exit(message: str) -> None:
    """Let the stage finish its work, then exit 1 with `message` (a failed tracker: stages/tracking.py)."""
    _at_exit.append(message)


def cli_errors(func: Callable) -> Callable:
    """Turn the errors a user can fix into one clear line and exit status 2 (1 for data problems and
    failed writes: `OSError`s such as a full disk or a read-only folder);
    a stop signal exits 128 + its number, as a shell reports a process killed by it."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _at_exit.clear()
        try:
            with stop_signals_raise():
                result = func(*args, **kwargs)
            if _at_exit:
                raise StageError("; ".join(_at_exit))
            return result
        except StageInterrupted as err:
            print(
                f"error: stopped by {signal.Signals(err.signum).name}"
                + (f"; {err.detail}" if err.detail else ""),
                file=sys.stderr,
            )
            raise typer.Exit(128 + err.signum)
        except ParamError as err:
            print(f"error: invalid parameter: {_with_params_file(str(err))}", file=sys.stderr)
            raise typer.Exit(2)
        except Exception as err:
            if not isinstance(err, (StageError, OSError, *_loaded_data_errors())):
                raise
            print(
                f"error: {_os_error_line(err) if isinstance(err, OSError) else err}",
                file=sys.stderr,
            )
            raise typer.Exit(1)

    return wrapper


# Written into every output folder a stage makes: what lets a later run tell its own output (which
# it may replace) from a folder of the user's (which it must not delete). Deterministic content,
# so a redone output hashes the same for DVC.
OUTPUT_MARKER = ".mockingjay-output"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _made_by(folder: Path) -> str | None:
    try:
        return json.loads((folder / OUTPUT_MARKER).read_text()).get("made_by")
    except (OSError, ValueError, AttributeError):
        return None


def check_inputs_apart(path: Path, inputs, option: str = "--out") -> None:
    """An output may neither hold nor lie inside any input: replacing it would delete the input."""
    target = _real(path)
    for item in inputs:
        if item is None:
            continue
        real = _real(item)
        if target == real or target in real.parents:
            raise StageError(
                f"{option} {path} holds the input {item}: the stage would delete it. A stage never "
                "deletes or writes inside its inputs; choose another folder (--force does not override this)"
            )
        if real in target.parents:
            raise StageError(
                f"{option} {path} is inside the input {item}: a stage never writes inside its inputs; "
                "choose a folder outside it (--force does not override this)"
            )


def audio_folders(rows) -> list[Path]:
    """The folders holding a manifest's audio files: inputs that an output must stay apart from."""
    return sorted({Path(row.path).parent for row in rows})


def check_output_dir(
    path: Path, stage: str, force: bool = False, inputs=(), option: str = "--out"
) -> None:
    """Before any work: `path` may become `stage`'s output folder only if it does not exist, is
    empty, or was made by `stage` (its marker file); `force` lets a non-empty folder be replaced.
    Never when it is the working directory (or holds it) or holds/lies inside an input."""
    target, cwd = _real(path), _real(Path.cwd())
    if not target.name or target == cwd or target in cwd.parents:
        raise StageError(
            f"{option} {path} is the current directory or holds it: the stage replaces its output "
            f"folder as a whole; name a folder for it, e.g. {Path(path) / stage}"
        )
    check_inputs_apart(path, inputs, option)
    if target.exists() and not target.is_dir():
        raise StageError(f"{option} {path} is a file; the stage writes a folder there")
    check_writable(path, option)
    if force or not target.is_dir():
        return
    made_by = _made_by(target)
    if made_by == f"mockingjay {stage}" or not any(target.iterdir()):
        return
    entries = sorted(p.name for p in target.iterdir())
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    who = f"made by {made_by}" if made_by else f"not made by `mockingjay {stage}`"
    raise StageError(
        f"{option} {path} is a non-empty folder {who} (holds {shown}); the stage would replace it "
        "and delete what it holds. Choose another folder, or pass --force to replace it"
    )


def check_output_file(path: Path | None, option: str) -> None:
    """A file option (--metrics, --plot) must not name a folder: found now, not after the work."""
    if path is not None and Path(path).is_dir():
        raise StageError(
            f"{option} {path} is a folder; give a file name, e.g. {Path(path) / 'metrics.json'}"
        )
    if path is not None:
        check_writable(path, option)


def check_writable(path: Path, option: str) -> None:
    """Before any work: the output's nearest existing folder must take a new file (a read-only
    folder, or a file where a folder should be, is found now, not after the work). A probe file is
    created and removed, since file modes alone do not say what root, ACLs or a read-only mount allow."""
    parent = _real(Path(os.path.abspath(path))).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StageError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mockingjay-write-check-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StageError(f"{option} {path}: cannot write in {parent}: {_cause(err)}") from None


@contextlib.contextmanager
def atomic_output_dir(path: Path, stage: str | None = None, force: bool = False) -> Iterator[Path]:
    """Build an output folder beside its final place (`.<name>.partial`) and move it there only when
    complete (`mockingjay.atomic.atomic_directory`: fsynced, renamed; removed on any error).

    The folder gets the marker file of `stage`; what it replaces is checked again at the end (the
    folder may have changed during the work): only an empty folder or one this stage made, unless
    `force`. Callers check the folder with `check_output_dir` before any work.
    """
    path = Path(os.path.abspath(path))  # "./" has no name to build a sibling from
    with atomic_directory(path, "partial") as tmp:
        yield tmp
        write_json(
            tmp / OUTPUT_MARKER, {"made_by": f"mockingjay {stage}" if stage else "mockingjay"}
        )
        if path.is_dir() and not force:
            made_by = _made_by(path)
            ours = made_by is not None and (stage is None or made_by == f"mockingjay {stage}")
            if not ours and any(path.iterdir()):
                raise StageError(
                    f"{path} became a non-empty folder the stage did not make while it ran; "
                    "left as it is (pass --force to replace it)"
                )


def worker_count(requested: int) -> int:
    """0 means one worker per usable CPU core."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def read_feature_config(features_dir: Path) -> dict:
    """The featurize stage's resolved settings (feature_config.json, global CMVN stats included)."""
    config_path = feature_config_file(features_dir)
    if not config_path.is_file():
        raise StageError(f"{config_path} not found; run the featurize stage first")
    return json.loads(config_path.read_text())
