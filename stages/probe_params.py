"""The `probe` section of params.yaml (`ProbeStageConfig`, a section per task) and the layer
selection of `--layer` / `probe.layers` (`parse_layer`), validated before anything heavy is
imported; the probe functions take the plain `ProbeConfig` each task section extends."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from mockingjay.config import ParamError
from mockingjay.probe_config import KINDS, SPEAKER_PROBE, MLPSettings, ProbeConfig

TASKS = ("phone", "speaker", "keyword")


@dataclass(frozen=True)
class ProbeTaskConfig(ProbeConfig):
    """One task's section (`probe.phone`, ...): how its heads train (ProbeConfig's fields) and what
    they are trained on."""

    kinds: list[str] = field(default_factory=lambda: ["linear"])  # linear | mlp | weighted_sum
    label_fractions: list[float] = field(
        default_factory=lambda: [1.0]
    )  # of the labelled train utterances
    speaker_independent: bool = False  # dev/test only on speakers with no train utterance
    corpora: list[str] = field(default_factory=list)  # empty: every corpus with the task's labels
    mlp: MLPSettings = field(default_factory=MLPSettings)

    def validate(self) -> None:
        super().validate()
        if not self.kinds or sorted(set(self.kinds) - set(KINDS)):
            raise ValueError(
                f"kinds: must be a non-empty subset of {list(KINDS)}, got {self.kinds}"
            )
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise ValueError(
                f"label_fractions: need at least one, each in (0, 1], got {self.label_fractions}"
            )
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ValueError(f"label_fractions: each fraction once, got {self.label_fractions}")

    def options(self) -> dict:
        """The probe functions' keyword options for this task (kinds, fractions, MLP settings)."""
        mlp = dataclasses.replace(
            self.mlp, weight_decays=self.mlp.weight_decays or self.weight_decays
        )
        return {
            "kinds": tuple(self.kinds),
            "fractions": tuple(sorted(self.label_fractions)),
            "mlp": mlp,
        }


@dataclass(frozen=True)
class UtteranceTaskConfig(ProbeTaskConfig):
    """`probe.speaker` and `probe.keyword`: SPEAKER_PROBE's training defaults (a few hundred pooled
    utterances, full-batch steps), also when the section gives only some keys."""

    epochs: int = SPEAKER_PROBE.epochs
    batch_size: int = SPEAKER_PROBE.batch_size
    learning_rates: tuple[float, ...] = SPEAKER_PROBE.learning_rates


@dataclass(frozen=True)
class ProbeStageConfig:
    """The `probe` section of params.yaml."""

    tasks: list[str] = field(default_factory=lambda: ["phone", "speaker"])
    layers: int | str | list[int] = "all"  # all | input | a hidden-state index | a list of indices
    mode: Literal["extracted", "online"] = "extracted"
    device: str = "auto"
    phone: ProbeTaskConfig = field(default_factory=ProbeTaskConfig)
    speaker: UtteranceTaskConfig = field(default_factory=UtteranceTaskConfig)
    keyword: UtteranceTaskConfig = field(default_factory=UtteranceTaskConfig)
    test_corpora: list[str] = field(
        default_factory=list
    )  # corpora prepared test_only: scored on their own

    def validate(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks: must be a non-empty subset of {list(TASKS)}, got {self.tasks}"
            )
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError(
                "layers: an empty list probes nothing; use all, input, N or [N, M, ...]"
            )


def parse_layer(value, num_layers: int) -> tuple[list[int] | None, bool]:
    """(--layer / probe.layers) all -> every hidden state + input; input -> the baseline only;
    N -> hidden state N; a list [N, M] (or "N,M") -> those hidden states. The log-mel baseline
    comes with `all` and `input` only: one named layer is probed alone."""
    if isinstance(value, (list, tuple)):
        indices = list(value)
    else:
        text = str(value).strip().lower()
        if text == "all":
            return list(range(num_layers + 1)), True
        if text == "input":
            return [], True
        try:
            indices = [int(part) for part in text.split(",")]
        except ValueError:
            raise ParamError(
                f"--layer: expected all, input, a layer index or a list of them, got {value!r}"
            ) from None
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= num_layers:
            raise ParamError(
                f"--layer: {index} is out of range; this model has hidden states 0..{num_layers} "
                f"(0 = input representation, {num_layers} = last layer), or use 'input' / 'all'"
            )
    return sorted(set(indices)), False
