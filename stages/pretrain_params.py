"""The `pretrain` section of params.yaml: a preset plus overrides, resolved into the model,
masking and training configs before any work starts (and before torch is imported), every error
naming its parameter (`pretrain.model.num_heads`, `pretrain.train.total_steps`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mockingjay.config import FieldError, ParamError, from_section, unknown_fields
from mockingjay.train_config import TrainConfig


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain` section: a preset plus overrides of the model, masking and training settings."""

    preset: str = "tera-base"
    model: dict = field(default_factory=dict)  # ModelConfig fields (hidden_size, num_layers, ...)
    mask: dict = field(
        default_factory=dict
    )  # MaskConfig fields (mask_proportion, span_length, ...)
    train: dict = field(
        default_factory=dict
    )  # TrainConfig fields (total_steps, learning_rate, ...)
    snapshots: list[int] = field(
        default_factory=list
    )  # checkpoint steps also kept as models in out/snapshots


def resolve_configs(section_values: dict, feature_dim: int, target_dim: int):
    """(ModelConfig, MaskConfig, TrainConfig) from params; every error names `pretrain.<...>`."""
    from mockingjay.mask_config import MaskConfig, mask_preset_config
    from mockingjay.model_config import PRESETS, ModelConfig, preset_config

    config = from_section(PretrainConfig, section_values, "pretrain")
    if config.preset not in PRESETS:
        raise ParamError(
            f"pretrain.preset: unknown preset {config.preset!r}; valid: {', '.join(sorted(PRESETS))}"
        )
    model_overrides = dict(config.model)
    preset = PRESETS[config.preset]
    for name, have in (("input_dim", feature_dim), ("target_dim", target_dim)):
        wanted = model_overrides.get(name, getattr(preset, name))
        if wanted != have:
            raise ParamError(
                f"pretrain.model.{name}: the {config.preset} preset expects {wanted}-d, but the features are {have}-d; "
                f"use the matching featurize preset (paper-* -> featurize.preset: paper, s3prl-base -> s3prl, "
                f"paper-large -> featurize.target: linear) or set pretrain.model.{name}"
            )
        model_overrides[name] = have
    _check_keys(model_overrides, ModelConfig, "pretrain.model")
    _check_keys(config.mask, MaskConfig, "pretrain.mask")
    try:
        model = preset_config(config.preset, **model_overrides)
    except FieldError as err:
        raise ParamError(err.named("pretrain.model")) from err
    except (ValueError, TypeError) as err:
        raise ParamError(str(err)) from err
    try:
        mask = mask_preset_config(config.preset, **config.mask)
    except FieldError as err:
        raise ParamError(err.named("pretrain.mask")) from err
    except (ValueError, TypeError) as err:
        raise ParamError(str(err)) from err
    train = from_section(TrainConfig, config.train, "pretrain.train")
    _check_snapshots(config.snapshots, train)
    return model, mask, train


def _check_snapshots(snapshots: list[int], train) -> None:
    """Snapshot steps must be checkpoint steps that are still kept when training ends."""
    for step in snapshots:
        if not 0 < step <= train.total_steps or step % train.checkpoint_every:
            raise ParamError(
                f"pretrain.snapshots: {step} is not a checkpoint step (multiples of "
                f"pretrain.train.checkpoint_every = {train.checkpoint_every} up to total_steps "
                f"{train.total_steps})"
            )
    if snapshots:
        needed = (train.total_steps - min(snapshots)) // train.checkpoint_every + 1
        if train.keep_checkpoints < needed:
            raise ParamError(
                f"pretrain.train.keep_checkpoints: {train.keep_checkpoints} would delete the "
                f"step-{min(snapshots)} checkpoint before the end; pretrain.snapshots needs >= {needed}"
            )


def _check_keys(values: dict, cls, name: str) -> None:
    unknown, known = unknown_fields(cls, values)
    if unknown:
        raise ParamError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
