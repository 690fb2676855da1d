"""The masked acoustic model's masking settings and presets (`MaskConfig`, `MASK_PRESETS`).

torch-free, so that `pretrain` names a bad parameter before it imports torch;
`mockingjay.masking` re-exports these names beside the masking they configure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mockingjay.config import FieldError, unknown_fields


@dataclass(frozen=True)
class MaskConfig:
    """MAM masking knobs (s3prl `task` config names in brackets).

    mask_proportion: fraction of each utterance's steps selected (`mask_proportion`, 0.15).
    span_length: C, consecutive steps per span (`mask_consecutive_min/max`; paper 7 BASE, 3 LARGE).
    zero_prob / random_prob: per-utterance chance the spans are zeroed / replaced by other frames
    of the utterance; the rest (1 - both) leaves them unchanged (paper 0.8 / 0.1 / 0.1).
    freq_mask_proportion: TERA frequency alteration, the largest band as a fraction of feature
    dims; each utterance zeroes one band of width U{0..floor(prop * D)} (`mask_frequency`, 0.2).
    noise_prob / noise_std: TERA magnitude alteration, chance per batch of adding N(0, std) noise
    to the inputs (`noise_proportion`; 0.15, std 0.2).
    """

    mask_proportion: float = 0.15
    span_length: int = 7
    zero_prob: float = 0.8
    random_prob: float = 0.1
    freq_mask_proportion: float = 0.0
    noise_prob: float = 0.0
    noise_std: float = 0.2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise FieldError (a ValueError) naming the first field that cannot make a sensible mask."""
        if not 0.0 < self.mask_proportion < 1.0:
            raise FieldError(
                "MaskConfig", "mask_proportion", f" must be in (0, 1), got {self.mask_proportion!r}"
            )
        if (
            isinstance(self.span_length, bool)
            or not isinstance(self.span_length, int)
            or self.span_length < 1
        ):
            raise FieldError(
                "MaskConfig", "span_length", f" must be an integer >= 1, got {self.span_length!r}"
            )
        for name in ("zero_prob", "random_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FieldError(
                    "MaskConfig", name, f" must be in [0, 1], got {getattr(self, name)!r}"
                )
        if self.zero_prob + self.random_prob > 1.0 + 1e-9:
            raise FieldError(
                "MaskConfig",
                "zero_prob",
                f" + random_prob must be <= 1, got {self.zero_prob} + {self.random_prob}",
            )
        if not 0.0 <= self.freq_mask_proportion < 1.0:
            raise FieldError(
                "MaskConfig",
                "freq_mask_proportion",
                f" must be in [0, 1), got {self.freq_mask_proportion!r}",
            )
        if not self.noise_std >= 0.0:
            raise FieldError("MaskConfig", "noise_std", f" must be >= 0, got {self.noise_std!r}")

    @property
    def keep_prob(self) -> float:
        return max(0.0, 1.0 - self.zero_prob - self.random_prob)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaskConfig:
        unknown, known = unknown_fields(cls, values)
        if unknown:
            raise ValueError(f"unknown MaskConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


# Keyed like mockingjay.model.PRESETS so a preset name picks both halves.
MASK_PRESETS: dict[str, MaskConfig] = {
    "paper-base": MaskConfig(span_length=7),
    "paper-large": MaskConfig(span_length=3),
    "tera-base": MaskConfig(span_length=7, freq_mask_proportion=0.2, noise_prob=0.15),
    "s3prl-base": MaskConfig(span_length=7),
}


def mask_preset_config(name: str, **overrides: Any) -> MaskConfig:
    """The named masking preset with fields replaced by `overrides` (validated)."""
    if name not in MASK_PRESETS:
        raise ValueError(f"unknown mask preset {name!r}; valid presets: {sorted(MASK_PRESETS)}")
    return MaskConfig.from_dict({**MASK_PRESETS[name].to_dict(), **overrides})
