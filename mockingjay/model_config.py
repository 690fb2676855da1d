"""The model's configuration and the paper's presets (`ModelConfig`, `PRESETS`, `preset_config`).

torch-free, so that `pretrain` names a bad parameter before it imports torch; `mockingjay.model`
re-exports these names beside the model they configure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mockingjay.config import FieldError, unknown_fields

# The non-linearities s3prl's `hidden_act` names (BERT's ACT2FN; mockingjay.model.ACTIVATIONS
# holds the functions); gelu is the exact erf form.
ACTIVATION_NAMES = ("gelu", "relu", "swish")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of a Mockingjay model (s3prl names in brackets).

    input_dim: feature dims per frame D (s3prl `input_dim`: 160 mel+delta, 80 mel, 240 fbank+d+dd).
    target_dim: dims per reconstructed frame (paper LARGE: 1025-bin linear spectrogram).
    hidden_size: H (`hidden_size`). num_layers: N (`num_hidden_layers`).
    num_heads: attention heads (`num_attention_heads`). intermediate_size: FFN width
    (`intermediate_size`). downsample_rate: R, frames stacked per step (`downsample_rate`).
    hidden_dropout / attention_dropout: (`hidden_dropout_prob` / `attention_probs_dropout_prob`).
    layer_norm_eps: (`layer_norm_eps`). initializer_range: std of the normal init
    (`initializer_range`). max_positions: steps in the pre-built sinusoidal table; longer inputs
    extend it once, so this only sizes the common case. activation: the FFN and prediction-head
    non-linearity (`hidden_act`: gelu, the exact erf form, as the paper; relu; swish).
    """

    input_dim: int
    target_dim: int
    hidden_size: int = 768
    num_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 3072
    downsample_rate: int = 1
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_positions: int = 4096
    activation: str = "gelu"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise FieldError (a ValueError) naming the first field that cannot make a working model."""
        for name in (
            "input_dim",
            "target_dim",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "downsample_rate",
            "max_positions",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FieldError("ModelConfig", name, f" must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise FieldError(
                "ModelConfig",
                "num_heads",
                f": {self.num_heads} does not divide hidden_size "
                f"{self.hidden_size}; each head gets hidden_size / num_heads dims",
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FieldError(
                    "ModelConfig", name, f" must be in [0, 1), got {getattr(self, name)!r}"
                )
        for name in ("layer_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise FieldError("ModelConfig", name, f" must be > 0, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise FieldError(
                "ModelConfig",
                "activation",
                f" must be one of {sorted(ACTIVATION_NAMES)}, got {self.activation!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        unknown, known = unknown_fields(cls, values)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        )
        if missing:
            raise ValueError(f"ModelConfig is missing required keys {missing}")
        return cls(**values)


# Paper Table 1 and the follow-ups; every preset is hidden 768, FFN 3072, 12 heads.
PRESETS: dict[str, ModelConfig] = {
    # 160-d = 80 log-mel + 80 delta, reconstructs the mel part: encoder 21.4M parameters.
    "paper-base": ModelConfig(input_dim=160, target_dim=80, num_layers=3, downsample_rate=1),
    # R=3 stacked steps, reconstructs the 1025-bin linear spectrogram: encoder 85.4M parameters.
    "paper-large": ModelConfig(input_dim=160, target_dim=1025, num_layers=12, downsample_rate=3),
    # TERA: 80-d log-mel at 10 ms in and out (frequency and magnitude alteration in masking).
    "tera-base": ModelConfig(input_dim=80, target_dim=80, num_layers=3, downsample_rate=1),
    # s3prl's config_model.yaml: 240-d fbank + delta + delta-delta in and out.
    "s3prl-base": ModelConfig(input_dim=240, target_dim=240, num_layers=3, downsample_rate=1),
}
DEFAULT_PRESET = "tera-base"


def preset_config(name: str = DEFAULT_PRESET, **overrides: Any) -> ModelConfig:
    """The named preset, with any field replaced by `overrides` (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
