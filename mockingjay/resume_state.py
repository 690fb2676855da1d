"""Pretraining resume state: one folder per configuration, kept until removed, behind a lock.

Layout of a checkpoints folder (e.g. `models/checkpoints`)::

    config-<fingerprint>/step-NNNNNN/   the checkpoints of one configuration (checkpoint.py)
    config-<fingerprint>/train_log.jsonl  its loss log across resumes
    .lock                               held (flock) by the run using the folder; names its PID

The fingerprint is a hash of what must match for a checkpoint to be resumed: the model, masking
and training settings (not logging or device knobs), the feature settings and the data
fingerprint. Trying another configuration therefore starts in its own folder and leaves every
other one as it was; coming back to a configuration resumes it. Folders are removed only on
request (`remove_state`). Whether a run resumes is decided here (`run_record`, `data_fingerprint`,
`adopt_older_layout`, `resume_decision`); the pretrain stage reports it. Only json and the standard
library here: listing needs no torch (checkpoint.py, which does, is imported where a checkpoint is read).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mockingjay import featstore
from mockingjay.atomic import publish_directory

STATE_PREFIX = "config-"
TRAIN_LOG = "train_log.jsonl"
LOCK_FILE = ".lock"
# TrainConfig fields that do not change what is trained: a checkpoint resumes across them
# (frame_rate: what older versions recorded there, now a property of the data).
IGNORED_TRAINING_KEYS = frozenset(
    {
        "device",
        "progress",
        "log_every",
        "num_workers",
        "checkpoint_every",
        "keep_checkpoints",
        "frame_rate",
    }
)
# What an older version left at the top of the folder (one configuration's state, unnamed).
_LEGACY = re.compile(r"^(step-\d+|\.step-.*|train_log\.jsonl)$")
_STEP = re.compile(r"^step-(\d+)$")


class ResumeStateError(RuntimeError):
    """The checkpoints folder cannot be used as asked; the message says why and what to do."""


def training_record(training: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in training.items() if k not in IGNORED_TRAINING_KEYS}


def run_record(
    model: dict[str, Any],
    mask: dict[str, Any],
    training: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """What must match to resume, for the run about to start: the model, masking and training
    settings (`to_dict()`s) and its provenance ({"features": ..., "data": {"fingerprint": ...}})."""
    return {"model": model, "mask": mask, "training": training_record(training), **provenance}


def data_fingerprint(stores: list[Path]) -> str:
    """sha256 of the stores' indexes (utterance ids and lengths): a checkpoint trained on other data
    is not resumed, even when every setting matches."""
    return featstore.fingerprint(stores)


def resume_record(stored: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume, from a checkpoint's config.json (the same shape the stage builds)."""
    return {
        "model": stored.get("model"),
        "mask": stored.get("mask"),
        "training": training_record(stored.get("training") or {}),
        "features": stored.get("features"),
        "data": stored.get("data"),
    }


def fingerprint(record: dict[str, Any]) -> str:
    # via JSON: a tuple and the list it is stored as, or an int-valued float, hash alike
    canonical = json.dumps(json.loads(json.dumps(record, default=str)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def state_dir(checkpoints: Path, record: dict[str, Any]) -> Path:
    return Path(checkpoints) / f"{STATE_PREFIX}{fingerprint(record)}"


def is_checkpoints_folder(folder: Path) -> bool:
    """True when every entry is one this module or an older version of it wrote."""
    return all(
        p.name.startswith(STATE_PREFIX) or p.name == LOCK_FILE or _LEGACY.match(p.name)
        for p in Path(folder).iterdir()
    )


def legacy_entries(checkpoints: Path) -> list[Path]:
    return (
        sorted(p for p in Path(checkpoints).iterdir() if _LEGACY.match(p.name))
        if Path(checkpoints).is_dir()
        else []
    )


def adopt_legacy(checkpoints: Path, stored_config: dict[str, Any]) -> Path:
    """Move the unnamed state an older version kept at the top (`step-*`, `train_log.jsonl`) into the
    folder of its configuration (`stored_config`: its newest complete checkpoint's config.json)."""
    dest = state_dir(checkpoints, resume_record(stored_config))
    if dest.exists():
        raise ResumeStateError(
            f"{dest} exists beside the older layout's step-* folders in {checkpoints}; "
            "move one of them away by hand"
        )
    tmp = dest.with_name(f".{dest.name}.adopting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for entry in legacy_entries(checkpoints):
        os.replace(entry, tmp / entry.name)
    publish_directory(
        tmp, dest
    )  # the state appears under its name whole, or stays in the hidden folder
    return dest


def adopt_older_layout(checkpoints: Path) -> Path | None:
    """Move the state an older version left at the top of `checkpoints` into its configuration's
    folder (`adopt_legacy`); returns that folder, or None when there was nothing to move."""
    from mockingjay.checkpoint import latest_checkpoint, load_config

    if not legacy_entries(checkpoints):
        return None
    legacy = latest_checkpoint(checkpoints)
    return None if legacy is None else adopt_legacy(checkpoints, load_config(legacy))


@dataclass(frozen=True)
class ResumeDecision:
    """Where a run of one configuration keeps its state, and what it finds there."""

    state: Path  # this configuration's folder (state_dir)
    latest: Path | None  # its newest complete checkpoint, resumed; None: the run starts afresh
    others: list[dict[str, Any]]  # the other configurations' states (list_states), kept as they are
    aside: (
        Path | None
    )  # `<checkpoints>.previous`, state an older version moved aside: never resumed


def resume_decision(checkpoints: Path, record: dict[str, Any]) -> ResumeDecision:
    """Whether the run of `record` (`run_record`) resumes: only from a checkpoint of the same
    configuration, feature settings and data, which is one in its own folder."""
    from mockingjay.checkpoint import latest_checkpoint

    checkpoints = Path(checkpoints)
    state = state_dir(checkpoints, record)
    latest = latest_checkpoint(state)
    others = [s for s in list_states(checkpoints, record) if s["path"] != state]
    aside = checkpoints.with_name(f"{checkpoints.name}.previous")
    return ResumeDecision(state, latest, others, aside if aside.is_dir() else None)


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """Records of a training log (TRAIN_LOG); a line cut short by a crash is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def is_model_dir(folder: Path) -> bool:
    """A model directory (what pretrain and import-checkpoint write): its config.json says so, and it
    holds nothing else a user could lose. (checkpoint.py's FORMAT_NAME and file names, spelled out
    here: importing checkpoint.py loads torch, and the stage checks its folders before that.)"""
    try:
        made = json.loads((folder / "config.json").read_text()).get("format") == "mockingjay-mam"
    except (OSError, ValueError, AttributeError):
        return False
    return made and {p.name for p in folder.iterdir()} <= {"config.json", "model.safetensors"}


def _steps(folder: Path) -> list[int]:
    return sorted(
        int(m.group(1)) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()
    )


def _stored_config(folder: Path) -> dict[str, Any]:
    for step in reversed(_steps(folder)):
        try:
            return json.loads((folder / f"step-{step:06d}" / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return {}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: value}


def list_states(checkpoints: Path, current: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every configuration's state: name, path, newest step, total steps, and (given the current
    resume record) the settings in which it differs, so that a user can tell them apart."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    now = (
        _flat(json.loads(json.dumps(current, default=str))) if current else {}
    )  # a tuple reads back as a list
    states = []
    for folder in sorted(
        p for p in checkpoints.iterdir() if p.name.startswith(STATE_PREFIX) and p.is_dir()
    ):
        stored = _stored_config(folder)
        steps = _steps(folder)
        theirs = _flat(resume_record(stored)) if stored else {}
        differs = [
            f"{key}={theirs.get(key)!r}"
            for key in sorted(set(now) | set(theirs))
            if now and theirs and key != "data.fingerprint" and now.get(key) != theirs.get(key)
        ]
        if now and theirs and now.get("data.fingerprint") != theirs.get("data.fingerprint"):
            differs.append("other data")
        states.append(
            {
                "name": folder.name,
                "path": folder,
                "step": steps[-1] if steps else None,
                "total_steps": (stored.get("training") or {}).get("total_steps"),
                "differs": differs,
            }
        )
    return states


def describe(state: dict[str, Any]) -> str:
    done = (
        "no checkpoint"
        if state["step"] is None
        else f"step {state['step']} of {state['total_steps']}"
    )
    differs = f"; differs in {', '.join(state['differs'][:4])}" if state["differs"] else ""
    more = f" and {len(state['differs']) - 4} more" if len(state["differs"]) > 4 else ""
    return f"{state['path']}: {done}{differs}{more}"


def remove_state(checkpoints: Path, name: str) -> Path:
    """Delete one configuration's state (`config-<fingerprint>`, or the fingerprint alone)."""
    name = name if name.startswith(STATE_PREFIX) else STATE_PREFIX + name
    folder = Path(checkpoints) / name
    if "/" in name or not folder.is_dir():
        known = ", ".join(s["name"] for s in list_states(checkpoints)) or "none"
        raise ResumeStateError(f"{folder}: no such resume state (have: {known})")
    shutil.rmtree(folder)
    return folder


@contextlib.contextmanager
def locked(checkpoints: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the folder while the body runs; refuse if another process holds it.

    flock: the kernel drops the lock when its holder exits, however it exits (SIGKILL included),
    so a crashed run never leaves a stale lock behind. The file keeps the holder's PID to name it.
    """
    checkpoints = Path(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    path = checkpoints / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ResumeStateError(
                f"{checkpoints} is in use by another run (PID {holder}); two runs on one checkpoints folder "
                "would corrupt each other's state. Wait for it to end, or pass another --checkpoints folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield checkpoints
    finally:
        os.close(
            fd
        )  # releases the lock; the file stays (removing it would race with the next taker)
