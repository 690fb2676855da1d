"""Atomic writes: a reader sees the old file or folder or the new one, never half of one.

Two mechanics, and every writer of the project uses one of them:

* a file (`write_file_atomically`, `write_text_atomically`, `write_json`): written beside its final
  place (`<name>.tmp` unless told otherwise), fsynced, renamed over the final name, and the folder
  fsynced, so the rename itself survives a crash. A failed write removes the half-written
  temporary and raises an OSError naming the file (a failed `write()` names none by itself);
* a folder (`temporary_directory`, `publish_directory`, `write_directory_atomically`,
  `atomic_directory`): built in a hidden sibling (`.<name>.tmp-<pid>` unless told otherwise),
  every file and folder in it fsynced, then renamed to the final name. What was there before is
  first renamed aside and removed only once the new folder is in place. A crash leaves at most the
  hidden sibling, which readers ignore.

Only the standard library here: every stage imports this, and the stages' argument errors must
come before torch is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents (a folder's: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def named_error(err: OSError, file: str | Path) -> OSError:
    """`err`, naming `file` when it names none (a failed `write()` says only "No space left")."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, str(file))


# -- files -------------------------------------------------------------------------------------


def write_file_atomically(
    path: str | Path, write: Callable[[Path], None], temp: Path | None = None
) -> Path:
    """Run `write(temp)` (it creates the file), fsync it, rename it to `path`, fsync the folder.

    `temp` defaults to `<path>.tmp` beside it. On any error the temporary is removed; an OSError
    is raised naming the file it failed on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp") if temp is None else Path(temp)
    try:
        write(temp)
        fsync_path(temp)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise named_error(err, temp) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, path)
    fsync_path(path.parent)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (module doc)."""
    return write_file_atomically(path, lambda temp: temp.write_text(text))


def write_json(
    path: str | Path,
    payload: Any,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = str,
) -> Path:
    """`payload` as indented JSON with a final newline, written atomically. `default=str` writes a
    Path (or any other value JSON has no type for) as its text; None refuses it (TypeError)."""
    return write_text_atomically(
        path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=default) + "\n"
    )


# -- folders -----------------------------------------------------------------------------------


def temporary_directory(final: str | Path, tag: str | None = None) -> Path:
    """A new empty hidden sibling of `final`, `.<name>.<tag>` (tag: `tmp-<pid>`), replacing one left
    by a crash; its parents are created."""
    final = Path(final)
    temp = final.with_name(f".{final.name}.{tag or f'tmp-{os.getpid()}'}")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    return temp


def publish_directory(temp: str | Path, final: str | Path) -> Path:
    """Fsync everything under the complete folder `temp`, then rename it to `final` (what was there
    is renamed aside first and removed once the new folder is in place) and fsync the parent."""
    temp, final = Path(temp), Path(final)
    for folder, _, files in os.walk(temp, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)
    old = None
    if final.exists():  # e.g. the same output written again: replace it
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(temp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path, tag: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder of `final` (`temporary_directory`); when the body ends
    without an error it is published as `final` (`publish_directory`), otherwise removed."""
    temp = temporary_directory(final, tag)
    try:
        yield temp
        publish_directory(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_directory_atomically(
    final: str | Path, write: Callable[[Path], None], tag: str | None = None
) -> Path:
    """Run `write(temp_dir)`, then publish the folder as `final`; on an error nothing is left."""
    with atomic_directory(final, tag) as temp:
        write(temp)
    return Path(final)
