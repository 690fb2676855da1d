"""The settings of a probe: how a task's heads are trained (`ProbeConfig`), which kinds of head
(`KINDS`) and the MLP head's own settings (`MLPSettings`).

Torch-free, so the probe stage validates its params section from these same classes (every error
names the parameter) before anything heavy is imported. The stage's per-task section extends
`ProbeConfig` with what selects the data (kinds, label fractions, corpora); the probe functions
take a plain `ProbeConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mockingjay.store_layout import is_store_name

KINDS = ("linear", "mlp", "weighted_sum")


class ProbeError(ValueError):
    """A probe cannot run as asked; the message names the layer, utterance or split at fault."""


@dataclass(frozen=True)
class ProbeConfig:
    """Training of a probe task.

    epochs: passes over the train split (the best epoch by dev accuracy is kept per head).
    batch_size: examples (frames or utterances) per Adam step; 0 = the whole train split.
    learning_rates, weight_decays: the grid; every (lr, wd) pair is one head per layer.
    seed: seeds the shuffling generator; with zero init the run is a pure function of it.
    eval_batch: examples per forward pass when scoring dev and test.
    """

    epochs: int = 20
    batch_size: int = 1024
    learning_rates: tuple[float, ...] = (2e-3,)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    seed: int = 0
    eval_batch: int = 8192

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ProbeError naming the first invalid field (`field: ...`)."""
        if self.epochs < 1:
            raise ProbeError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 0:
            raise ProbeError(f"batch_size: must be >= 0 (0 = full batch), got {self.batch_size}")
        if self.eval_batch < 1:
            raise ProbeError(f"eval_batch: must be >= 1, got {self.eval_batch}")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ProbeError(
                f"learning_rates: need at least one, all > 0, got {list(self.learning_rates)}"
            )
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ProbeError(
                f"weight_decays: need at least one, all >= 0, got {list(self.weight_decays)}"
            )

    def grid(self) -> list[tuple[float, float]]:
        """(learning rate, weight decay) of each head, in head order."""
        return [(lr, wd) for lr in self.learning_rates for wd in self.weight_decays]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training(self) -> ProbeConfig:
        """This config's ProbeConfig fields alone (a subclass's extra settings dropped)."""
        return ProbeConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ProbeConfig)}
        )


# Frame phone probe: ~80k labelled frames per epoch on the bundled corpus, mini-batches of 1024
# frames. On 768-d layers 2e-3 beats 1e-2 (noisier) and the best epoch is typically 15-19 of 20.
PHONE_PROBE = ProbeConfig(epochs=20, batch_size=1024, learning_rates=(2e-3,))  # = ProbeConfig()
# Speaker probe: a few hundred utterance means, full-batch steps, many cheap epochs.
SPEAKER_PROBE = ProbeConfig(epochs=300, batch_size=0, learning_rates=(1e-2,))


@dataclass(frozen=True)
class MLPSettings:
    """The one-hidden-layer probe (s3prl's `phone_1hidden`): Linear(H, hidden), ReLU, dropout, Linear."""

    hidden_size: int = 768
    dropout: float = 0.1
    learning_rate: float = 1e-3
    epochs: int | None = None  # None: the task's epochs
    weight_decays: tuple[float, ...] | None = None  # None: the task's grid
    layers: tuple[str, ...] = ()  # store names (input, layer_03); empty: every probed layer

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.weight_decays is not None and (
            not self.weight_decays or min(self.weight_decays) < 0
        ):
            raise ProbeError(
                f"weight_decays: need at least one, all >= 0, or null; got {self.weight_decays}"
            )
        bad = [n for n in self.layers if not is_store_name(n)]
        if bad:
            raise ProbeError(f"layers: expected store names like input or layer_03, got {bad}")
        if self.hidden_size < 1:
            raise ProbeError(f"hidden_size: must be >= 1, got {self.hidden_size}")
        if not 0 <= self.dropout < 1:
            raise ProbeError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            raise ProbeError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.epochs is not None and self.epochs < 1:
            raise ProbeError(f"epochs: must be >= 1 or null, got {self.epochs}")
