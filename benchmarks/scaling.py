"""How featurize and pretraining time grow with corpus size and sequence length; memory with both.

Prints one JSON object with up to three parts (`--parts`):

featurize  benchmarks/featurize.py's end-to-end run (the stage's own write_features, a fresh
           process each) on k synthetic copies of the bundled corpus for each k of `--sizes`:
           seconds, real-time factor, CPU seconds, peak RSS of the main process and the workers.
pretrain   the trainer (mockingjay.trainer, the real loop on CPU) on the bundled corpus's train +
           dev features repeated k times (`--features`, default data/features; a synthetic
           80-d store when it is missing), a small model (`--hidden-size` 128, `--num-layers` 2):
           steady audio-s/s over `--steps` steps after `--warmup`, seconds per 1,000 frames, the
           epoch time that implies (or measured whole epochs with `--epochs N`), the time to open
           the store and to plan an epoch's batches, and memory: peak RSS, anonymous RSS and
           file-backed RSS (pages of the memory-mapped store, which the kernel can drop). Each
           size runs in a fresh process. Also: planning one epoch for a LibriSpeech-960-sized
           corpus (281,241 utterances).
seqlen     one forward + backward + AdamW step of the same small model at each of `--seq-lens`
           frames, at a fixed frame budget per batch (`--seq-frames-per-batch`, batch = budget /
           T, as the trainer packs batches): ms per step, ms per 1,000 frames, and the step's
           peak memory (RSS above what the process held before the step), each in a fresh process.

    python benchmarks/scaling.py                                   # everything, about 3 minutes idle
    python benchmarks/scaling.py --parts pretrain --sizes 1,4,16 --epochs 1
    python benchmarks/scaling.py --quick                           # smoke run, small sizes

Timings on a shared machine are noisy: the load average is recorded before and after each part.
Pass `--threads 1` on a loaded machine (torch's two OpenMP threads on two busy cores can stall).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from benchlib import (
    FRAMES_PER_SECOND,
    ROOT,
    IntervalTimer,
    machine,
    memory_mb,
    repeat_store,
    reset_peak_rss,
    run_json,
    width,
    write_synthetic_store,
)

DEFAULT_MANIFEST = ROOT / "data" / "prepared" / "manifest.tsv"
LIBRISPEECH_960_UTTERANCES = 281_241
LIBRISPEECH_960_FRAMES = 345_600_000  # 960 h at 10 ms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="featurize,pretrain,seqlen")
    p.add_argument(
        "--sizes", default="1,4,16", help="corpus sizes, in copies of the bundled corpus"
    )
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="featurize: the corpus")
    p.add_argument(
        "--featurize-runs", type=int, default=1, help="featurize: runs per size (best is kept)"
    )
    p.add_argument("--featurize-sizes", default=None, help="featurize: sizes, if not --sizes")
    p.add_argument(
        "--features",
        type=Path,
        default=ROOT / "data" / "features",
        help="pretrain: a featurize output folder (train + dev are repeated)",
    )
    p.add_argument("--steps", type=int, default=10, help="pretrain: timed steps per size")
    p.add_argument(
        "--warmup", type=int, default=2, help="pretrain: untimed steps (also the log interval)"
    )
    p.add_argument(
        "--epochs", type=int, default=0, help="pretrain: time this many whole epochs instead"
    )
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--max-frames-per-batch", type=int, default=6000)
    p.add_argument("--max-length", type=int, default=500)
    p.add_argument("--seq-lens", default="500,1000,1500,3000")
    p.add_argument("--seq-frames-per-batch", type=int, default=6000)
    p.add_argument("--seq-steps", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in each measuring process"
    )
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: sizes 1,2, two steps, short sequences"
    )
    p.add_argument("--child", choices=["pretrain", "seqlen"], help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    if p.parse_args(argv).quick:  # smaller defaults; options given explicitly still win
        p.set_defaults(
            sizes="1,2",
            steps=2,
            warmup=1,
            seq_lens="64,128",
            seq_frames_per_batch=256,
            seq_steps=1,
            hidden_size=32,
            num_layers=1,
            max_frames_per_batch=800,
            max_length=100,
        )
    return p.parse_args(argv)


def small_model_config(args, dim: int):
    from mockingjay.model import preset_config

    return preset_config(
        "tera-base",
        input_dim=dim,
        target_dim=dim,
        num_layers=args.num_layers,
        **width(args.hidden_size),
    )


def set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- children


def child_pretrain(args) -> dict:
    """The trainer on one store: steady rate, epoch time, open/plan times, memory."""
    import torch

    from mockingjay.batching import FeatureDataset, LengthBucketBatchSampler
    from mockingjay.masking import MaskConfig
    from mockingjay.trainer import TrainConfig, TrainData, train

    set_threads(args)
    start = time.perf_counter()
    dataset = FeatureDataset(args.store)
    open_sec = time.perf_counter() - start
    start = time.perf_counter()
    sampler = LengthBucketBatchSampler(
        dataset.lengths, args.max_frames_per_batch, max_length=args.max_length
    )
    sampler.global_batches(1)
    plan_sec = time.perf_counter() - start
    batches_per_epoch = sampler.batches_per_epoch(0)
    interval = max(1, args.warmup)
    if args.epochs:
        total_steps = args.epochs * batches_per_epoch
    else:
        total_steps = interval + interval * -(-args.steps // interval)
    timer = IntervalTimer()
    config = TrainConfig(
        total_steps=total_steps,
        learning_rate=1e-3,
        max_frames_per_batch=args.max_frames_per_batch,
        max_length=args.max_length,
        log_every=interval,
        checkpoint_every=total_steps,
        device="cpu",
        progress=False,
    )
    out = Path(tempfile.mkdtemp(prefix="scaling-run-", dir=args.tmp))
    try:
        result = train(
            small_model_config(args, dataset.input_dim),
            MaskConfig(span_length=7),
            config,
            TrainData(args.store),
            out / "checkpoints",
            out / "model",
            callback=timer,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    frames = int(np.minimum(dataset.lengths, args.max_length).sum())  # an epoch, after cropping
    report = {
        "store_open_sec": round(open_sec, 4),
        "epoch_plan_sec": round(plan_sec, 4),
        "batches_per_epoch": batches_per_epoch,
        "epoch_frames_after_crop": frames,
        "torch_threads": torch.get_num_threads(),
        **memory_mb(),
    }
    if args.epochs:
        report.update(
            epochs=args.epochs,
            steps=result["steps"],
            epoch_sec=round(result["train_seconds"] / args.epochs, 3),
            audio_seconds_per_second=round(result["audio_seconds_per_second"], 1),
        )
    else:
        steady = timer.steady(skip=1)
        report.update(steady)
        report["epoch_sec_projected"] = round(
            frames / FRAMES_PER_SECOND / steady["audio_seconds_per_second"], 2
        )
    report["sec_per_1000_frames"] = round(
        1000 / FRAMES_PER_SECOND / report["audio_seconds_per_second"], 4
    )
    return report


def child_seqlen(args) -> dict:
    """One model-only step (benchmarks/pretrain_throughput.py's) at T frames: time and peak memory."""
    import torch
    from pretrain_throughput import make_train_step

    from mockingjay.masking import MaskConfig
    from mockingjay.model import MockingjayForMAM

    set_threads(args)
    torch.manual_seed(0)
    frames = args.frames
    batch = max(1, args.seq_frames_per_batch // frames)
    model = MockingjayForMAM(small_model_config(args, 80)).train()
    features = torch.randn(batch, frames, 80)
    lengths = torch.full((batch,), frames)
    step = make_train_step(model, features, lengths, None, MaskConfig(span_length=7))
    before = memory_mb()
    reset = reset_peak_rss()
    start = time.perf_counter()
    step()  # the first step allocates the optimizer state and every activation buffer
    first_sec = time.perf_counter() - start
    after_first = memory_mb()
    start = time.perf_counter()
    for _ in range(args.seq_steps):
        step()
    seconds = (time.perf_counter() - start) / args.seq_steps
    peak = memory_mb()["peak_rss_mb"]
    return {
        "frames": frames,
        "batch": batch,
        "frames_per_batch": batch * frames,
        "ms_per_step": round(1000 * seconds, 2),
        "first_step_ms": round(1000 * first_sec, 2),
        "ms_per_1000_frames": round(1e6 * seconds / (batch * frames), 3),
        "step_peak_mb": round(peak - before["rss_mb"], 1) if reset else None,
        "rss_before_mb": before["rss_mb"],
        "rss_after_first_step_mb": after_first["rss_mb"],
        "peak_rss_mb": peak,
        "peak_reset": reset,
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- parts


def child_command(args, part: str, **extra) -> list[str]:
    command = [
        sys.executable,
        __file__,
        "--child",
        part,
        "--hidden-size",
        str(args.hidden_size),
        "--num-layers",
        str(args.num_layers),
        "--max-frames-per-batch",
        str(args.max_frames_per_batch),
        "--max-length",
        str(args.max_length),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--epochs",
        str(args.epochs),
        "--seq-frames-per-batch",
        str(args.seq_frames_per_batch),
        "--seq-steps",
        str(args.seq_steps),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.tmp:
        command += ["--tmp", str(args.tmp)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    return command


def with_growth(rows: list[dict], size_key: str, keys: list[str]) -> list[dict]:
    """Each row's value of `keys` relative to the first (smallest) size."""
    base = rows[0]
    for row in rows:
        row["relative_to_smallest"] = {
            k: round(row[k] / base[k], 3) for k in keys if row.get(k) and base.get(k)
        }
        row["relative_to_smallest"][size_key] = round(row[size_key] / base[size_key], 3)
    return rows


def part_featurize(args, sizes: list[int], tmp: Path) -> dict:
    """benchmarks/featurize.py's end-to-end run (the stage's write_features in a fresh process)
    on k synthetic copies of the corpus, best of --featurize-runs."""
    from mockingjay.manifest import read_manifest

    if args.manifest.is_file():
        base_audio_sec = sum(row.duration for row in read_manifest(args.manifest))
    elif args.manifest == DEFAULT_MANIFEST:
        base_audio_sec = None  # featurize.py runs the prepare stage first
    else:
        raise SystemExit(f"{args.manifest}: no such manifest")
    rows = []
    for k in sizes:
        load_before = os.getloadavg()
        runs = []
        for r in range(args.featurize_runs):
            out = tmp / f"featurize_{k}_{r}"
            runs.append(
                run_json(
                    [
                        sys.executable,
                        str(ROOT / "benchmarks" / "featurize.py"),
                        "--e2e-child",
                        "current",
                        "--out",
                        str(out),
                        "--manifest",
                        str(args.manifest),
                        "--repeat",
                        str(k),
                    ]
                )
            )
            shutil.rmtree(out, ignore_errors=True)
        if base_audio_sec is None:
            base_audio_sec = sum(row.duration for row in read_manifest(args.manifest))
        best = min(runs, key=lambda run: run["sec"])
        audio_sec = k * base_audio_sec
        rows.append(
            {
                "size": k,
                "audio_sec": round(audio_sec, 1),
                "seconds": round(best["sec"], 4),
                "runs_sec": [round(run["sec"], 3) for run in runs],
                "real_time_factor": round(audio_sec / best["sec"], 1),
                "sec_per_audio_hour": round(3600 * best["sec"] / audio_sec, 3),
                "cpu_sec": round(best["main_cpu_sec"] + best["worker_cpu_sec"], 3),
                "peak_rss_main_mb": round(max(run["peak_rss_main_mb"] for run in runs), 1),
                "peak_rss_worker_mb": round(max(run["peak_rss_worker_mb"] for run in runs), 1),
                "workers": best["workers"],
                "loadavg": [round(x, 2) for x in load_before + os.getloadavg()],
            }
        )
    return {
        "runs_per_size": args.featurize_runs,
        "manifest": str(args.manifest),
        "sizes": with_growth(
            rows, "audio_sec", ["seconds", "peak_rss_main_mb", "peak_rss_worker_mb"]
        ),
    }


def base_stores(args, tmp: Path) -> tuple[list[Path], str]:
    from mockingjay.featstore import is_store

    stores = [args.features / s for s in ("train", "dev") if is_store(args.features / s)]
    if stores and not args.quick:
        return stores, str(args.features)
    # No featurize output (or a smoke run): a synthetic stand-in of the bundled corpus's shape.
    count, longest = (40, 120) if args.quick else (480, 600)
    path = tmp / "synthetic_base"
    write_synthetic_store(path, count, longest, 80, min_frames=20 if args.quick else 60)
    return (
        [path],
        "synthetic (480 utterances of 60-600 frames, 80-d)"
        if not args.quick
        else "synthetic (smoke)",
    )


def part_pretrain(args, sizes: list[int], tmp: Path) -> dict:
    sources, described = base_stores(args, tmp)
    rows = []
    for k in sizes:
        store = tmp / f"repeat_{k}"
        summary = repeat_store(sources, store, k)
        load_before = os.getloadavg()
        report = run_json(child_command(args, "pretrain", store=store))
        rows.append(
            {
                "size": k,
                "utterances": summary["utterances"],
                "frames": summary["frames"],
                "store_mb": round(summary["bytes"] / 2**20, 1),
                **report,
                "loadavg": [round(x, 2) for x in load_before + os.getloadavg()],
            }
        )
        shutil.rmtree(store, ignore_errors=True)
    time_key = "epoch_sec" if args.epochs else "epoch_sec_projected"
    return {
        "source": described,
        "model": {"hidden_size": args.hidden_size, "num_layers": args.num_layers},
        "max_frames_per_batch": args.max_frames_per_batch,
        "max_length": args.max_length,
        "sizes": with_growth(
            rows,
            "frames",
            [
                time_key,
                "sec_per_1000_frames",
                "peak_rss_mb",
                "rss_anon_mb",
                "store_open_sec",
                "epoch_plan_sec",
            ],
        ),
        "epoch_plan_at_librispeech_960": plan_librispeech_960(args),
    }


def plan_librispeech_960(args) -> dict:
    """Seconds to plan one epoch of batches for 281,241 utterances (lengths like LibriSpeech's)."""
    from mockingjay.batching import LengthBucketBatchSampler

    rng = np.random.default_rng(0)
    mean = LIBRISPEECH_960_FRAMES / LIBRISPEECH_960_UTTERANCES
    lengths = np.clip(rng.normal(mean, 0.35 * mean, LIBRISPEECH_960_UTTERANCES), 100, 3500).astype(
        np.int64
    )
    start = time.perf_counter()
    sampler = LengthBucketBatchSampler(
        lengths, 48000, max_batch_size=32, max_length=1500, rank=0, world_size=8
    )
    sampler.global_batches(1)
    return {
        "utterances": len(lengths),
        "frames": int(lengths.sum()),
        "max_frames_per_batch": 48000,
        "world_size": 8,
        "seconds": round(time.perf_counter() - start, 3),
        "global_batches_per_epoch": len(sampler.global_batches(0)),
    }


def part_seqlen(args) -> dict:
    rows = []
    for frames in [int(x) for x in args.seq_lens.split(",")]:
        load_before = os.getloadavg()
        report = run_json(child_command(args, "seqlen", frames=frames))
        rows.append({**report, "loadavg": [round(x, 2) for x in load_before + os.getloadavg()]})
    return {
        "model": {"hidden_size": args.hidden_size, "num_layers": args.num_layers},
        "frames_per_batch": args.seq_frames_per_batch,
        "lengths": with_growth(
            rows, "frames", ["ms_per_step", "ms_per_1000_frames", "step_peak_mb"]
        ),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        report = child_pretrain(args) if args.child == "pretrain" else child_seqlen(args)
        print(json.dumps(report))
        return report
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"featurize", "pretrain", "seqlen"}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}")
    sizes = [int(x) for x in args.sizes.split(",")]
    result: dict = {"machine": machine(), "threads": args.threads}
    tmp = Path(tempfile.mkdtemp(prefix="scaling-", dir=args.tmp))
    try:
        if "featurize" in parts:
            if args.quick and not args.manifest.is_file():
                result["featurize"] = {
                    "skipped": f"{args.manifest} missing (a smoke run does not run prepare)"
                }
            else:
                result["featurize"] = part_featurize(
                    args, [int(x) for x in (args.featurize_sizes or args.sizes).split(",")], tmp
                )
        if "pretrain" in parts:
            result["pretrain"] = part_pretrain(args, sizes, tmp)
        if "seqlen" in parts:
            result["seqlen"] = part_seqlen(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
