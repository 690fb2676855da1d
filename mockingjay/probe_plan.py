"""What a probe run trains and on which examples: kinds of heads, label fractions, selections.

A probe task trains, in one pass over its data, a set of heads keyed by name:

* `linear`: the paper's linear softmax on one layer (`LayerHeads`), keyed by the layer's store
  name (`input`, `layer_00`, ...: `store_layout.py`) at label fraction 1 and `<layer>@<fraction>` below it;
* `weighted_sum`: a softmax-weighted sum of the hidden states (`layer_00` .. `layer_NN`, not the
  log-mel input, whose width differs) into one linear softmax, keyed `weighted_sum[@fraction]`;
* `mlp`: one hidden layer on one layer, keyed `mlp:<layer>`, trained on all labels (its cost is
  a hundred times a linear head's; the low-resource curve is the linear and weighted-sum one).

Label fractions are nested and deterministic: train utterances are ranked by a hash of
(seed, utterance id), and fraction f keeps the first ceil(f * n), so the 1% set lies inside the
10% set whatever else is in the corpus. Standardisation statistics always come from the whole
train split (they use no labels); hyper-parameters are chosen on the whole dev split.

Selections say which utterances of each split take part in a task: its corpora, utterances with
a label (keyword), and, speaker-independent, only dev/test utterances of speakers with no train
utterance, i.e. speakers the probe (and, with `prepare` `split_by: speaker`, pretraining) never heard.

The reports of the heads trained (`head_reports`, `extra_test_report`) are shaped here for every task.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mockingjay.probe_heads import (
    KINDS,
    LayerHeads,
    MLPSettings,
    ProbeConfig,
    ProbeError,
    layer_report,
)
from mockingjay.probe_torch_heads import TorchHeads
from mockingjay.store_layout import INPUT_STORE, SPLITS


@dataclass(frozen=True)
class Utterance:
    """One row of the featurize stage's `utterances.tsv`."""

    split: str
    corpus: str
    speaker: str
    keyword: str = ""


def read_utterances(utterances_tsv: str | Path) -> dict[str, Utterance]:
    """utt_id -> split, corpus, speaker, keyword (older tables without `keyword` read as "")."""
    with open(utterances_tsv, newline="", encoding="utf-8") as f:
        return {
            row["utt_id"]: Utterance(
                row["split"], row["corpus"], row["speaker"], row.get("keyword") or ""
            )
            for row in csv.DictReader(f, delimiter="\t")
        }


def test_corpora_sets(
    utterances: Mapping[str, Utterance], test_corpora: Sequence[str], need_keyword: bool = False
) -> dict[str, set[str]]:
    """corpus -> its test utterances, for the corpora prepared only for testing (`test_only`)."""
    sets = {
        c: {
            u
            for u, i in utterances.items()
            if i.corpus == c and i.split == "test" and (i.keyword or not need_keyword)
        }
        for c in test_corpora
    }
    for corpus, chosen in sets.items():
        if not chosen:
            raise ProbeError(
                f"test_corpora: corpus {corpus!r} has no test utterances for this task "
                f"(prepare it with test_only: true)"
            )
    return sets


def select_utterances(
    utterances: Mapping[str, Utterance],
    corpora: Sequence[str] = (),
    speaker_independent: bool = False,
    need_keyword: bool = False,
    exclude_corpora: Sequence[str] = (),
) -> dict[str, set[str]]:
    """split -> the utterance ids that take part in a task (see the module docstring); the
    `exclude_corpora` (test-only corpora, scored on their own) take no part."""
    unknown = sorted(
        (set(corpora) | set(exclude_corpora)) - {u.corpus for u in utterances.values()}
    )
    if unknown:
        have = sorted({u.corpus for u in utterances.values()})
        raise ProbeError(f"corpora {unknown} are not in the features (have {have})")
    chosen = {split: set() for split in SPLITS}
    for utt, info in utterances.items():
        if (corpora and info.corpus not in corpora) or info.corpus in exclude_corpora:
            continue
        if need_keyword and not info.keyword:
            continue
        chosen.setdefault(info.split, set()).add(utt)
    if speaker_independent:
        heard = {utterances[u].speaker for u in chosen["train"]}
        for split in ("dev", "test"):
            unseen = {u for u in chosen[split] if utterances[u].speaker not in heard}
            if split == "test" and not unseen:
                raise ProbeError(
                    "speaker_independent: no test utterance of a speaker absent from train; "
                    "prepare the corpus with split_by: speaker"
                )
            chosen[split] = (
                unseen or chosen[split]
            )  # no unseen dev speaker: select on the usual dev split
    return chosen


def fraction_members(
    train_ids: Iterable[str], fractions: Sequence[float], seed: int
) -> dict[float, set[str]]:
    """fraction -> the nested, deterministic subset of train utterances it learns from."""
    ranked = sorted(
        train_ids, key=lambda u: hashlib.sha256(f"{seed}:fraction:{u}".encode()).digest()
    )
    return {f: set(ranked[: max(1, math.ceil(f * len(ranked)))]) for f in fractions}


def fraction_key(name: str, fraction: float) -> str:
    return name if fraction == 1.0 else f"{name}@{fraction:g}"


def build_heads(
    names: Sequence[str],
    moments: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    config: ProbeConfig,
    device: torch.device,
    kinds: Sequence[str] = ("linear",),
    fractions: Sequence[float] = (1.0,),
    mlp: MLPSettings = MLPSettings(),
) -> tuple[dict[str, LayerHeads | TorchHeads], dict[str, int], dict[str, tuple[str, str, float]]]:
    """(heads by key, epochs by key, key -> (kind, layer, fraction)) for one task."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ProbeError(f"unknown probe kind(s) {unknown}; valid: {list(KINDS)}")
    heads: dict[str, LayerHeads | TorchHeads] = {}
    epochs: dict[str, int] = {}
    described: dict[str, tuple[str, str, float]] = {}
    hidden = [n for n in names if n != INPUT_STORE]
    for fraction in fractions:
        if "linear" in kinds:
            for name in names:
                key = fraction_key(name, fraction)
                heads[key] = LayerHeads(
                    *moments[name],
                    num_classes,
                    config.grid(),
                    device,
                    source=name,
                    fraction=fraction,
                )
                epochs[key], described[key] = config.epochs, ("linear", name, fraction)
        if "weighted_sum" in kinds and len(hidden) >= 2:
            key = fraction_key("weighted_sum", fraction)
            heads[key] = TorchHeads(
                "weighted_sum",
                hidden,
                moments,
                num_classes,
                config.grid(),
                device,
                seed=config.seed,
            )
            heads[key].fraction = fraction
            epochs[key], described[key] = config.epochs, ("weighted_sum", "weighted_sum", fraction)
    if "mlp" in kinds:
        grid = mlp_grid(config, mlp)
        missing = sorted(set(mlp.layers) - set(names))
        if missing:
            raise ProbeError(f"mlp.layers {missing} are not among the probed layers {list(names)}")
        for name in [n for n in names if not mlp.layers or n in mlp.layers]:
            key = f"mlp:{name}"
            heads[key] = TorchHeads(
                "mlp", [name], moments, num_classes, grid, device, mlp=mlp, seed=config.seed
            )
            heads[key].fraction = 1.0
            epochs[key], described[key] = mlp.epochs or config.epochs, ("mlp", name, 1.0)
    return heads, epochs, described


def mlp_grid(config: ProbeConfig, mlp: MLPSettings) -> list[tuple[float, float]]:
    return [(mlp.learning_rate, wd) for wd in (mlp.weight_decays or config.weight_decays)]


def head_grid(
    head: LayerHeads | TorchHeads, config: ProbeConfig, mlp: MLPSettings
) -> list[tuple[float, float]]:
    if isinstance(head, TorchHeads) and head.kind == "mlp":
        return mlp_grid(config, mlp)
    return config.grid()


def fraction_masks(
    members: Mapping[float, set[str]], ids: Sequence[str], example_items: np.ndarray
) -> dict[float, np.ndarray]:
    """fraction -> bool per train example (examples map to utterances through `example_items`)."""
    masks = {}
    for fraction, chosen in members.items():
        in_subset = np.fromiter((utt in chosen for utt in ids), dtype=bool, count=len(ids))
        masks[fraction] = in_subset[example_items]
    return masks


def position_chunks(count: int, size: int) -> Iterator[np.ndarray]:
    """Positions 0 .. count - 1 in consecutive batches of at most `size` (evaluation order)."""
    for start in range(0, count, size):
        yield np.arange(start, min(start + size, count))


def head_reports(
    heads, described, config, mlp, truth, predicted, majority, class_names
) -> tuple[dict, list]:
    """({layer: report} of the linear heads at fraction 1, [report with kind/layer/fraction] of every head)."""
    layers, probes = {}, []
    for key, head in heads.items():
        kind, layer, fraction = described[key]
        report = layer_report(
            head, head_grid(head, config, mlp), truth, predicted[key], majority, class_names
        )
        probes.append({"kind": kind, "layer": layer, "fraction": fraction, **report})
        if kind == "linear" and fraction == 1.0:
            layers[layer] = report
    return layers, probes


def extra_test_report(heads, described, truth, predicted, majority) -> dict:
    """{"examples": n, "heads": [{kind, layer, fraction, accuracy, majority_rate}]} of one extra test set."""
    reports = []
    for key in heads:
        kind, layer, fraction = described[key]
        accuracy = float(np.mean(predicted[key] == truth)) if len(truth) else float("nan")
        reports.append(
            {
                "kind": kind,
                "layer": layer,
                "fraction": fraction,
                "accuracy": accuracy,
                "majority_rate": float(np.mean(truth == majority)) if len(truth) else float("nan"),
            }
        )
    return {"examples": int(len(truth)), "heads": reports}
