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


def cli_errors(func: Callable) -> Callable:
    """Turn the errors a user can fix into one clear line and exit status 2 (1 for data problems)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from mockingjay.audio import AudioError
        from mockingjay.corpora import CorpusError
        from mockingjay.featstore import StoreError

        try:
            return func(*args, **kwargs)
        except ParamError as err:
            print(f"error: invalid parameter: {err}", file=sys.stderr)
            raise typer.Exit(2)
        except (CorpusError, AudioError, StoreError, StageError, FileNotFoundError) as err:
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


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def worker_count(requested: int) -> int:
    """0 means one worker per usable CPU core."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
