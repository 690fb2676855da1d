"""What every stage shares: params loading, atomic output folders, clear CLI errors, workers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import typer

from mockingjay.config import ParamError, load_params

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params file to read the stage's section from")


class StageError(RuntimeError):
    """A stage cannot run; the message says what to fix."""


def section(params_file: Path, name: str) -> dict:
    params = load_params(params_file)
    value = params.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamError(f"{name}: expected a mapping in {params_file}")
    return value


# The errors of bad data, by the module that raises them (module -> class name).
DATA_ERRORS = {"mockingjay.audio": "AudioError", "mockingjay.checkpoint": "CheckpointError",
               "mockingjay.corpora": "CorpusError", "mockingjay.featstore": "StoreError",
               "stages.tracking": "TrackingError"}


def _loaded_data_errors() -> tuple[type, ...]:
    # Only a module already imported can have raised its error; importing the others here would
    # load torch (mockingjay.checkpoint) and make every parameter error seconds slower.
    return tuple(getattr(sys.modules[module], name) for module, name in DATA_ERRORS.items() if module in sys.modules)


def cli_errors(func: Callable) -> Callable:
    """Turn the errors a user can fix into one clear line and exit status 2 (1 for data problems)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ParamError as err:
            print(f"error: invalid parameter: {err}", file=sys.stderr)
            raise typer.Exit(2)
        except Exception as err:
            if not isinstance(err, (StageError, FileNotFoundError, *_loaded_data_errors())):
                raise
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(1)

    return wrapper


@contextlib.contextmanager
def atomic_output_dir(path: Path) -> Iterator[Path]:
    """Build an output folder beside its final place and move it there only when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


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
    config_path = features_dir / "feature_config.json"
    if not config_path.is_file():
        raise StageError(f"{config_path} not found; run the featurize stage first")
    return json.loads(config_path.read_text())
