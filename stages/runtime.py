"""What the stages that run a model share: the device, and the model-vs-features check."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import StageError, read_feature_config


def resolve_device(name: str):
    from mockingjay.device import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as err:
        raise StageError(str(err)) from err


FEATURE_KEYS = ("sample_rate", "n_mels", "win_ms", "hop_ms", "n_fft", "delta_order", "delta_window", "log_offset", "cmvn")


def check_model_features(model_dir: Path, features_dir: Path) -> dict:
    """The model's recorded feature settings must match the features it is about to be fed.

    Returns the features' settings. A model without recorded settings (e.g. imported without
    them) is accepted with a warning that names what the user must make sure of.
    """
    from mockingjay.checkpoint import load_config

    if not model_dir.is_dir():
        raise StageError(f"model directory {model_dir} not found; run the pretrain stage or pass --model/--checkpoint")
    features = read_feature_config(features_dir)
    stored = load_config(model_dir)
    model_features = stored.get("features")
    for difference in (stored.get("import") or {}).get("feature_differences") or []:  # import-checkpoint
        print(f"warning: {model_dir} was imported; its features may differ from the source's: {difference}", file=sys.stderr)
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
            f"{model_dir} was trained on other features than {features_dir}: " + "; ".join(differences)
            + ". Re-featurize with the model's settings (params.yaml featurize section) or pick the matching model."
        )
    return features
