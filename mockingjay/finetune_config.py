"""The settings of a fine-tuning run: the downstream head (`HeadConfig`) and what is trained and
how (`FinetuneConfig`). Torch-free, so the finetune stage names a bad parameter before importing
torch; the training loop's own settings (steps, rate of the head, warm-up, clipping, batching,
device) are a `TrainConfig`.

Variants (`VARIANTS`), the rows of the paper's comparison:

* `finetuned`: the pretrained encoder and the head trained jointly (the paper's BASE-FT2);
* `frozen`: the pretrained encoder frozen, the head alone trained (the frozen-representation
  probe through the same loop, the same data and the same head);
* `scratch`: a randomly initialised encoder of the same size, trained exactly as `finetuned`
  (what pretraining buys);
* `logmel`: no encoder, the head on the log-mel input features (the paper's baseline row).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

TASK_LEVELS = {"phone": "frame", "speaker": "utterance", "keyword": "utterance"}
VARIANTS = ("finetuned", "frozen", "scratch", "logmel")
HEAD_KINDS = ("linear", "mlp")
HEAD_LAYERS = ("last", "weighted_sum")
POOLINGS = ("mean", "attentive")


class FinetuneConfigError(ValueError):
    """A fine-tuning setting is invalid; `field` names it (the stage prefixes its section)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class HeadConfig:
    """The downstream head on the encoder.

    kind: `linear` (the probes' linear softmax) or `mlp` (one hidden layer, ReLU, dropout).
    layer: `last` (the last hidden state) or `weighted_sum` (softmax-weighted sum of every hidden
        state, weights learnt with the head, as SUPERB).
    pooling: utterance tasks only: `mean` over valid frames, or `attentive` (a learnt score per
        frame, softmax over the utterance, as self-attentive pooling).
    hidden_size, dropout: of the MLP head (dropout also before a linear head when > 0).
    """

    kind: str = "linear"
    layer: str = "last"
    pooling: str = "mean"
    hidden_size: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name, allowed in (("kind", HEAD_KINDS), ("layer", HEAD_LAYERS), ("pooling", POOLINGS)):
            if getattr(self, name) not in allowed:
                raise FinetuneConfigError(
                    name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.hidden_size < 1:
            raise FinetuneConfigError("hidden_size", f"must be >= 1, got {self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise FinetuneConfigError("dropout", f"must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """SpecAugment-style masking of the training inputs, drawn with the pretraining masking code
    (`mockingjay.masking.mask_batch`, every selected span zeroed): `time_mask_proportion` of each
    utterance's frames in spans of `span_length`, and one band of up to `freq_mask_proportion`
    of the bins per utterance. 0 and 0: no augmentation."""

    time_mask_proportion: float = 0.0
    span_length: int = 7
    freq_mask_proportion: float = 0.0

    def __post_init__(self) -> None:
        for name in ("time_mask_proportion", "freq_mask_proportion"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FinetuneConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.span_length < 1:
            raise FinetuneConfigError("span_length", f"must be >= 1, got {self.span_length}")

    @property
    def enabled(self) -> bool:
        return self.time_mask_proportion > 0 or self.freq_mask_proportion > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run of one task and variant.

    task: `phone` (frame level), `speaker` or `keyword` (utterance level).
    variant: see the module docstring.
    encoder_learning_rate: peak rate of the encoder's parameters (the head's is
        `TrainConfig.learning_rate`; the paper fine-tunes the downstream at 4e-3, both under the
        same BERT-style warm-up and linear decay).
    freeze_encoder_steps: the encoder is frozen (no gradient, eval mode) for the first k steps,
        so the head settles before it moves the encoder; `frozen` freezes it throughout.
    freeze_input_representation: keep the input projection and its LayerNorm frozen throughout.
    encoder_dropout: the encoder's dropout while fine-tuning (None: the pretraining value).
    """

    task: str = "phone"
    variant: str = "finetuned"
    num_classes: int = 2
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    encoder_learning_rate: float = 1e-4
    freeze_encoder_steps: int = 0
    freeze_input_representation: bool = False
    encoder_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.task not in TASK_LEVELS:
            raise FinetuneConfigError(
                "task", f"must be one of {', '.join(TASK_LEVELS)}, got {self.task!r}"
            )
        if self.variant not in VARIANTS:
            raise FinetuneConfigError(
                "variant", f"must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        if self.num_classes < 2:
            raise FinetuneConfigError("num_classes", f"must be >= 2, got {self.num_classes}")
        if not 0 < self.encoder_learning_rate < math.inf:
            raise FinetuneConfigError(
                "encoder_learning_rate",
                f"must be a positive number, got {self.encoder_learning_rate}",
            )
        if self.freeze_encoder_steps < 0:
            raise FinetuneConfigError(
                "freeze_encoder_steps", f"must be >= 0, got {self.freeze_encoder_steps}"
            )
        if self.encoder_dropout is not None and not 0.0 <= self.encoder_dropout < 1.0:
            raise FinetuneConfigError(
                "encoder_dropout", f"must be in [0, 1) or null, got {self.encoder_dropout}"
            )
        if self.variant == "logmel" and self.head.layer == "weighted_sum":
            raise FinetuneConfigError(
                "head.layer", "weighted_sum needs an encoder; the logmel variant has none"
            )

    @property
    def level(self) -> str:
        return TASK_LEVELS[self.task]

    @property
    def has_encoder(self) -> bool:
        return self.variant != "logmel"

    @property
    def pretrained(self) -> bool:
        return self.variant in ("finetuned", "frozen")

    def encoder_frozen_at(self, step: int) -> bool:
        """Whether the encoder is frozen during optimizer step `step` (0-based)."""
        return self.variant == "frozen" or step < self.freeze_encoder_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        values = dict(values)
        values["head"] = HeadConfig(**values.get("head", {}))
        values["augment"] = AugmentConfig(**values.get("augment", {}))
        return cls(**values)
