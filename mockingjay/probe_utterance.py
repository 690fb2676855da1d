"""The utterance-level probe: one example per utterance vector, for speaker ID and keywords.

`probe_utterances` trains and scores the heads on given utterance vectors ({split: {name: [N, D]}}):
the statistics-pooled representation stores (`probe_labels`, `probe_speakers`, pooled by
`pooled_utterances`) or the pooled statistics of the online probe's one pass over the model
(`probe_online`). The heads, label
fractions and reports are those of the frame-level phone probe (`probe_plan`, `probe_heads`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from mockingjay.featstore import RaggedArray
from mockingjay.probe_heads import (
    SPEAKER_PROBE,
    MLPSettings,
    ProbeConfig,
    ProbeError,
    RunningMoments,
    predict,
    train_heads,
)
from mockingjay.probe_plan import (
    build_heads,
    extra_test_report,
    fraction_masks,
    fraction_members,
    head_reports,
    position_chunks,
)
from mockingjay.probe_stores import Representations, check_same_items
from mockingjay.store_layout import SPLITS


def probe_utterances(
    vectors: Mapping[str, Mapping[str, np.ndarray]],
    ids: Mapping[str, Sequence[str]],
    speakers: Mapping[str, str],
    config: ProbeConfig = SPEAKER_PROBE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    task: str = "speaker",
    include: Mapping[str, set[str]] | None = None,
    kinds: Sequence[str] = ("linear",),
    fractions: Sequence[float] = (1.0,),
    mlp: MLPSettings = MLPSettings(),
    extra_tests: Mapping[str, set[str]] | None = None,
) -> dict:
    """Utterance-level probe on utterance vectors ({split: {name: [N, D]}}, rows in `ids[split]` order);
    `speakers` maps each utterance to its class (the speaker, or the keyword for task "keyword").

    Classes are the train labels. Dev and test utterances of classes absent from train cannot
    be classified: they are left out and listed in the result ("ignored").
    """
    started = time.perf_counter()
    device = torch.device(device)
    chosen_ids = {
        split: [i for i, utt in enumerate(ids[split]) if include is None or utt in include[split]]
        for split in SPLITS
    }
    for split in SPLITS:
        missing = next(
            (ids[split][i] for i in chosen_ids[split] if ids[split][i] not in speakers), None
        )
        if missing is not None:
            raise ProbeError(f"{split}: utterance {missing!r} has no {task} label")
    classes = sorted({speakers[ids["train"][i]] for i in chosen_ids["train"]})
    if len(classes) < 2:
        raise ProbeError(f"train: {len(classes)} {task} class(es); a {task} probe needs at least 2")
    class_of = {label: i for i, label in enumerate(classes)}
    sets = {split: split for split in SPLITS}
    for name, wanted in (extra_tests or {}).items():
        sets[f"test:{name}"] = "test"
        chosen_ids[f"test:{name}"] = [
            i for i, utt in enumerate(ids["test"]) if utt in wanted and utt in speakers
        ]
    keep, targets, ignored = {}, {}, {}
    for key, split in sets.items():
        known = [i for i in chosen_ids[key] if speakers[ids[split][i]] in class_of]
        unknown = sorted({speakers[ids[split][i]] for i in chosen_ids[key]} - set(class_of))
        ignored[key] = {"utterances": len(chosen_ids[key]) - len(known), "classes": unknown}
        if not known and key in SPLITS:
            raise ProbeError(f"{key}: no utterance of a {task} class seen in train")
        keep[key] = np.asarray(known, dtype=np.int64)
        targets[key] = torch.tensor(
            [class_of[speakers[ids[split][i]]] for i in known], device=device
        )
    names = list(vectors["train"])
    inputs = {
        key: {name: torch.from_numpy(vectors[split][name][keep[key]]).to(device) for name in names}
        for key, split in sets.items()
    }
    moments = {}
    for name in names:
        running = RunningMoments(inputs["train"][name].shape[1])
        running.update(inputs["train"][name])
        moments[name] = running.mean_std()
    heads, epochs, described = build_heads(
        names, moments, len(classes), config, device, kinds, fractions, mlp
    )
    train_ids = [ids["train"][i] for i in keep["train"]]
    members = fraction_members(train_ids, fractions, config.seed)
    masks = {
        f: torch.from_numpy(m).to(device)
        for f, m in fraction_masks(members, train_ids, np.arange(len(train_ids))).items()
    }

    def batches(split: str, positions: Iterator[np.ndarray]) -> Iterator[tuple]:
        for chosen in positions:
            index = torch.from_numpy(chosen).to(device)
            batch_masks = {f: m[index] for f, m in masks.items()} if split == "train" else {}
            yield (
                targets[split][index],
                {name: inputs[split][name][index] for name in names},
                batch_masks,
            )

    generator = torch.Generator().manual_seed(config.seed)
    count = len(keep["train"])
    batch_size = config.batch_size or count

    def train_batches(epoch: int) -> Iterator[tuple]:
        order = (
            torch.randperm(count, generator=generator).numpy()
            if batch_size < count
            else np.arange(count)
        )
        return batches(
            "train", (np.sort(order[i : i + batch_size]) for i in range(0, count, batch_size))
        )

    def dev_batches() -> Iterator[tuple]:
        return batches("dev", position_chunks(len(keep["dev"]), config.eval_batch))

    train_heads(heads, epochs, train_batches, dev_batches, progress, f"{task} probe")
    truth, predicted = predict(
        heads, batches("test", position_chunks(len(keep["test"]), config.eval_batch))
    )
    majority = int(np.bincount(targets["train"].cpu().numpy(), minlength=len(classes)).argmax())
    layers, probes = head_reports(
        heads, described, config, mlp, truth, predicted, majority, classes
    )
    extra = {}
    for name in extra_tests or {}:
        key = f"test:{name}"
        if not len(keep[key]):  # e.g. a closed-set speaker probe on a corpus of unseen speakers
            extra[name] = {
                "examples": 0,
                "heads": [],
                "note": f"no test utterance of a {task} class seen in train",
            }
            continue
        extra_truth, extra_predicted = predict(
            heads, batches(key, position_chunks(len(keep[key]), config.eval_batch))
        )
        extra[name] = extra_test_report(heads, described, extra_truth, extra_predicted, majority)
    return {
        **({"extra_tests": extra} if extra else {}),
        "task": task,
        "classes": classes,
        "examples": {split: int(len(keep[split])) for split in SPLITS},
        "fraction_utterances": {f"{f:g}": len(m) for f, m in members.items()},
        "majority_class": classes[majority],
        "ignored": ignored,
        "note": f"dev/test utterances of {task} classes absent from train are left out (see 'ignored')",
        "config": config.to_dict(),
        "pooling": "statistics: mean and standard deviation over frames, per layer",
        "standardisation": "per layer, mean/std of the train split's pooled vectors",
        "layers": layers,
        "probes": probes,
        "seconds": round(time.perf_counter() - started, 3),
    }


def utterance_stats(store: RaggedArray) -> np.ndarray:
    """[items, 2 * dim] float32: each utterance's mean and standard deviation (statistics pooling,
    as x-vectors do; accumulated in float64). The mean alone is no baseline for log-mel: under
    per-utterance CMVN every utterance's mean is zero."""
    stats = np.zeros((len(store), 2 * store.dim), dtype=np.float32)
    for item in range(len(store)):
        if store.lengths[item]:
            rows = np.asarray(store[item], dtype=np.float64)
            stats[item, : store.dim] = rows.mean(0)
            stats[item, store.dim :] = rows.std(0)
    return stats


def probe_speakers(
    representations: Representations,
    speakers: Mapping[str, str],
    config: ProbeConfig = SPEAKER_PROBE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **options,
) -> dict:
    """Utterance-level speaker probe on statistics-pooled representations (speakers: utt_id -> speaker)."""
    return probe_labels(representations, speakers, "speaker", config, device, progress, **options)


def probe_labels(
    representations: Representations,
    utterance_labels: Mapping[str, str],
    task: str,
    config: ProbeConfig = SPEAKER_PROBE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **options,
) -> dict:
    """Utterance-level probe (speaker, keyword) of statistics-pooled representations."""
    vectors, ids = pooled_utterances(representations)
    return probe_utterances(
        vectors, ids, utterance_labels, config, device, progress, task=task, **options
    )


def pooled_utterances(representations: Representations) -> tuple[dict, dict]:
    """({split: {name: [N, 2H] statistics}}, {split: ids}): pooled once, for every utterance task."""
    names = list(representations["train"])
    ids = {split: check_same_items(representations[split], split, names).ids for split in SPLITS}
    vectors = {
        split: {name: utterance_stats(store) for name, store in representations[split].items()}
        for split in SPLITS
    }
    return vectors, ids
