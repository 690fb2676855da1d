"""What the stages that run a model share: the device, the model-vs-features check, and the
`extract` section (online probing encodes long utterances in extract's windows)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mockingjay.config import ParamError, from_section

from .common import StageError, read_feature_config, section


def resolve_device(name: str):
    from mockingjay.device import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as err:
        raise StageError(str(err)) from err


FEATURE_KEYS = (
    "sample_rate",
    "n_mels",
    "win_ms",
    "hop_ms",
    "n_fft",
    "delta_order",
    "delta_window",
    "log_offset",
    "cmvn",
)


def check_model_features(model_dir: Path, features_dir: Path) -> dict:
    """The model's recorded feature settings must match the features it is about to be fed.

    Returns the features' settings. A model without recorded settings (e.g. imported without
    them) is accepted with a warning that names what the user must make sure of.
    """
    from mockingjay.checkpoint import load_config

    if not model_dir.is_dir():
        raise StageError(
            f"model directory {model_dir} not found; run the pretrain stage or pass --model/--checkpoint"
        )
    features = read_feature_config(features_dir)
    stored = load_config(model_dir)
    model_features = stored.get("features")
    for difference in (stored.get("import") or {}).get(
        "feature_differences"
    ) or []:  # import-checkpoint
        print(
            f"warning: {model_dir} was imported; its features may differ from the source's: {difference}",
            file=sys.stderr,
        )
    if not model_features:
        print(
            f"warning: {model_dir} records no feature settings; make sure {features_dir} was made the way "
            f"the model was trained ({', '.join(f'{k}={features.get(k)}' for k in FEATURE_KEYS)})",
            file=sys.stderr,
        )
        return features
    differences = [
        f"{key}: model {model_features.get(key)!r} vs features {features.get(key)!r}"
        for key in FEATURE_KEYS
        if model_features.get(key) != features.get(key)
    ]
    if differences:
        raise StageError(
            f"{model_dir} was trained on other features than {features_dir}: "
            + "; ".join(differences)
            + ". Re-featurize with the model's settings (params.yaml featurize section) or pick the matching model."
        )
    return features


@dataclass(frozen=True)
class ExtractConfig:
    """The `extract` section of params.yaml."""

    layers: list[int] | None = None  # hidden-state indices; null = all N+1
    batch_frames: int = 32_000  # padded frames per forward pass (bounds memory)
    # longest utterance encoded whole; longer ones go through the model in windows of this many frames
    # (mockingjay/extract.py: windows), which bounds memory whatever the length. = DEFAULT_WINDOW_FRAMES,
    # not imported from there: it loads torch, and parameter errors must come before that
    window_frames: int | None = 4000
    device: str = "auto"

    def validate(self) -> None:
        if self.batch_frames <= 0:
            raise ValueError(f"batch_frames: must be positive, got {self.batch_frames}")
        if self.window_frames is not None and (
            isinstance(self.window_frames, bool) or self.window_frames < 16
        ):
            raise ValueError(
                f"window_frames: must be an integer >= 16 (or null = no windows), got {self.window_frames}"
            )


def extract_config(params: Path) -> ExtractConfig:
    return from_section(ExtractConfig, section(params, "extract"), "extract")


def window_frames(config: ExtractConfig, downsample_rate: int) -> int | None:
    """`extract.window_frames`, checked against the model (its steps stack `downsample_rate` frames):
    extract and online probing encode long utterances in the same windows."""
    from mockingjay.extract import ExtractError, check_window_frames

    if config.window_frames is not None:
        try:
            check_window_frames(config.window_frames, downsample_rate)
        except ExtractError as err:
            raise ParamError(f"extract.{err}") from err
    return config.window_frames
