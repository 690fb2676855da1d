"""Checkpoints and final model directories, written atomically, read without executing code.

Layout::

    <output>/checkpoints/step-000100/
        model.safetensors   encoder + head weights (safetensors: tensors only, no pickle)
        config.json         {"format", "format_version", "model": {...}, "mask": {...}, "training": {...}}
        trainer_state.pt    optimizer, scheduler, step, epoch, batch_in_epoch, RNG states, ...
    <output>/model/
        model.safetensors   as above
        config.json         as above

Every directory is written into a hidden temporary sibling (`.step-000100.tmp-<pid>`), each file
fsynced, then renamed into place (`mockingjay.atomic`; the weights and trainer-state writers and
the RNG states are `mockingjay.tensor_files`'): a crash leaves at most a temporary directory, which readers
ignore. `trainer_state.pt` holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`. Each `model.safetensors` records the model config it was saved
with (metadata `model_config`): loading refuses a config.json edited since.
A failed write raises an OSError naming the file. `latest_checkpoint` verifies the newest checkpoint and falls back
to the previous one, with a warning naming it, when it is truncated or incomplete (s3prl#332).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from mockingjay import atomic
from mockingjay.store_layout import feature_config_file
from mockingjay.tensor_files import save_safetensors, save_torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
FORMAT_NAME = "mockingjay-mam"
FORMAT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint or model directory is missing, incomplete or unreadable."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or corrupt."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# The model config a weights file was saved with, in its safetensors metadata: an edited
# config.json (num_heads 8 for weights trained with 4 has the same tensor shapes) would otherwise
# load silently and compute other features. It is the file's only metadata key (save_safetensors).
_CONFIG_METADATA = "model_config"


def _model_metadata(model_section: dict[str, Any]) -> dict[str, str]:
    return {_CONFIG_METADATA: json.dumps(model_section, sort_keys=True, separators=(",", ":"))}


def _check_model_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    """The weights' recorded model config must be config.json's; files without one still load."""
    stored = (metadata or {}).get(_CONFIG_METADATA)
    if stored is None:
        return
    config = _read_config(path)["model"]
    if _model_metadata(config)[_CONFIG_METADATA] == stored:
        return
    try:
        saved = json.loads(stored)
    except ValueError:
        saved = {}
    differences = [
        f"{key}: weights {saved.get(key)!r} vs config.json {config.get(key)!r}"
        for key in sorted(set(saved) | set(config))
        if saved.get(key) != config.get(key)
    ]
    raise CheckpointError(
        f"{path / MODEL_FILE}: its weights were saved with another model config than {path / CONFIG_FILE}: "
        + ("; ".join(differences) or "fingerprints differ")
        + f". {CONFIG_FILE} was edited after saving; restore the values the weights were saved with"
    )


def _write_json(path: Path, payload: dict) -> None:
    atomic.write_json(path, payload, sort_keys=True, default=None)


def _umask_file_mode() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def write_directory_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """`atomic.write_directory_atomically`, every file given the mode a plain `open()` would give
    it (0666 less the umask): safetensors writes through a private temporary file (mode 0600),
    which left `model.safetensors` unreadable to the group and others while every other output
    was 0644."""
    mode = _umask_file_mode()

    def write_with_modes(tmp: Path) -> None:
        write(tmp)
        for file in tmp.iterdir():
            if file.is_file():
                os.chmod(file, mode)

    return atomic.write_directory_atomically(final, write_with_modes)


def _config_payload(config: dict[str, Any]) -> dict[str, Any]:
    if "model" not in config:
        raise ValueError("config must have a 'model' section (ModelConfig.to_dict())")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **config}


# -- training checkpoints ---------------------------------------------------------------------


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write `checkpoints_dir/step-NNNNNN/` atomically, then prune to the last `keep_last`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints_dir = Path(checkpoints_dir)
    payload = _config_payload(config)

    def write(tmp: Path) -> None:
        # the step is the directory's name and in trainer_state.pt: the one metadata key is the config
        save_safetensors(
            save_model, unwrap_model(model), tmp / MODEL_FILE, _model_metadata(payload["model"])
        )
        _write_json(tmp / CONFIG_FILE, payload)
        save_torch(trainer_state, tmp / TRAINER_STATE_FILE)

    path = write_directory_atomically(checkpoints_dir / checkpoint_name(step), write)
    _prune(checkpoints_dir, step, keep_last)
    return path


def _prune(checkpoints_dir: Path, saved_step: int, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints up to `saved_step`, and stale temps.

    Checkpoints numbered above `saved_step` are left alone: they belong to a run we did not
    resume from (corrupt ones, skipped with a warning) and are replaced when training gets there.
    """
    current = [
        (step, path) for step, path in list_checkpoints(checkpoints_dir) if step <= saved_step
    ]
    for _, path in current[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in checkpoints_dir.glob(".step-*.*-*"):  # crashed writes of an earlier run
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-NNNNNN` directory, oldest first; temporary dirs excluded."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless every file is present and readable."""
    path = Path(path)
    for name in (MODEL_FILE, CONFIG_FILE, TRAINER_STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
    _read_config(path)
    try:
        # Parsing the header checks that the file covers every tensor it declares.
        with safe_open(str(path / MODEL_FILE), framework="pt") as weights:
            weights.keys()
    except Exception as err:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable ({err})") from err
    load_trainer_state(path)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(
                f"skipping incomplete or corrupt checkpoint {path}: {err}",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        return path
    return None


def load_trainer_state(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE_FILE
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err


def load_weights(
    path: str | Path, model: torch.nn.Module, device: str | torch.device = "cpu"
) -> None:
    """Load `path/model.safetensors` into `model` (strict: every key must match)."""
    file = Path(path) / MODEL_FILE
    model = unwrap_model(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(file), framework="pt") as weights:
            stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
            metadata = weights.metadata()
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    problems = [f"missing {name}" for name in sorted(set(expected) - set(stored))]
    problems += [f"unexpected {name}" for name in sorted(set(stored) - set(expected))]
    problems += [
        f"{name}: file {list(stored[name])} vs model {list(shape)}"
        for name, shape in expected.items()
        if name in stored and stored[name] != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{file}: weights do not match the model config: {'; '.join(problems[:3])}{more}"
        )
    _check_model_metadata(Path(path), metadata)  # same shapes, other config (num_heads)
    try:
        load_model(model, str(file), strict=True, device=str(device))
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err


def load_config(path: str | Path) -> dict[str, Any]:
    """The `config.json` of a checkpoint or model directory."""
    return _read_config(Path(path))


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    try:
        payload = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    if payload.get("format") != FORMAT_NAME or "model" not in payload:
        raise CheckpointError(
            f"{file}: not a {FORMAT_NAME} config (format {payload.get('format')!r})"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {payload['format_version']} is newer than "
            f"this code reads ({FORMAT_VERSION})"
        )
    return payload


# -- the final model directory ----------------------------------------------------------------


def save_model_dir(
    path: str | Path,
    model: torch.nn.Module,
    config: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model.safetensors` + `config.json` atomically; `config` is the ModelConfig.

    `extra` adds sections to config.json (e.g. "mask", "training") for the record.
    """
    model_section = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    payload = _config_payload({**(extra or {}), "model": model_section})

    def write(tmp: Path) -> None:
        save_safetensors(
            save_model, unwrap_model(model), tmp / MODEL_FILE, _model_metadata(payload["model"])
        )
        _write_json(tmp / CONFIG_FILE, payload)

    return write_directory_atomically(Path(path), write)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(MockingjayForMAM, ModelConfig) from a model or checkpoint directory, in eval mode.

    Only JSON and safetensors are read: nothing in the directory can execute code.
    """
    from mockingjay.model import MockingjayForMAM, ModelConfig  # here, to keep imports light

    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: no {MODEL_FILE}; not a model directory")
    try:
        config = ModelConfig.from_dict(_read_config(path)["model"])
    except (
        TypeError,
        ValueError,
    ) as err:  # e.g. num_heads edited to one that does not divide hidden_size
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {err}") from err
    model = MockingjayForMAM(config)
    load_weights(path, model, device=device)
    return model.to(device).eval(), config


ENCODER_PREFIX = "encoder."  # the encoder's parameter names in a pretrained and a fine-tuned model


def is_finetuned_dir(path: str | Path) -> bool:
    """A model directory written by fine-tuning (encoder + classification head)."""
    return "finetune" in _read_config(Path(path))


def encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors (names without the `encoder.` prefix) of a pretrained or fine-tuned
    model directory, read from safetensors only."""
    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as weights:
            state = {
                name[len(ENCODER_PREFIX) :]: weights.get_tensor(name)
                for name in weights.keys()
                if name.startswith(ENCODER_PREFIX)
            }
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    if not state:
        raise CheckpointError(
            f"{file}: no encoder weights (a log-mel fine-tuning baseline has no encoder)"
        )
    return state


def load_encoder_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(MockingjayEncoder, ModelConfig) of a pretrained or a fine-tuned model directory, in eval
    mode: what extraction, the probes and export read. Only JSON and safetensors are read."""
    from mockingjay.model import MockingjayEncoder, ModelConfig

    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: no {MODEL_FILE}; not a model directory")
    try:
        config = ModelConfig.from_dict(_read_config(path)["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {err}") from err
    encoder = MockingjayEncoder(config)
    state = encoder_state(path)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path / MODEL_FILE}: encoder weights do not match the model config: {err}"
        ) from err
    return encoder.to(device).eval(), config


def release_model_dir(source: str | Path, out: str | Path, feature_config: dict[str, Any]) -> Path:
    """A copy of model directory `source` for distribution: float16 weights (half the bytes; the
    model computes in float32 after loading, which casts), its config.json with a `release`
    note, and `feature_config.json`, the settings of the features it was trained on."""
    from safetensors.torch import save_file

    source = Path(source)
    with safe_open(
        str(source / MODEL_FILE), framework="pt"
    ) as stored:  # one read: tensors and metadata
        weights = {name: stored.get_tensor(name) for name in stored.keys()}
        metadata = {k: v for k, v in (stored.metadata() or {}).items() if k == _CONFIG_METADATA}
    payload = _read_config(source)
    payload["release"] = {"dtype": "float16", "from": str(source)}

    def write(tmp: Path) -> None:
        save_safetensors(
            save_file,
            {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
            tmp / MODEL_FILE,
            metadata,
        )
        _write_json(tmp / CONFIG_FILE, payload)
        _write_json(feature_config_file(tmp), feature_config)

    return write_directory_atomically(Path(out), write)
