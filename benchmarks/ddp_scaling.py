"""Does the DDP path scale on CPU? Samples/s per process: N gloo ranks vs one process, one thread each.

Both sides run mockingjay.trainer's own loop (`Trainer.fit()`, which joins the process group
when torchrun sets RANK/WORLD_SIZE: DistributedDataParallel, the sampler's per-rank share of
each epoch's batches, all-reduced log numbers) on the same synthetic store of equal-length
utterances, so every step of every rank is one [batch, frames] batch, the same per-process
batch in both cases. The single process is a plain `python` run; the DDP run is
`python -m torch.distributed.run --standalone --nproc_per_node N`. OMP_NUM_THREADS=1 and
`torch.set_num_threads(1)` in every process. Rates are the steady state after the first log
interval (see benchlib.IntervalTimer); runs alternate single/DDP `--repeats` times and the best
of each is compared (issue 7 target: per-process rate >= 80% of the single process).

    python benchmarks/ddp_scaling.py                 # 2 ranks, about 1 minute on 2 idle cores
    python benchmarks/ddp_scaling.py --quick         # smoke run

On a 2-core machine the two ranks need both cores: anything else running shows up directly in
the DDP figure. The load average before and after each run is in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import (
    FRAMES_PER_SECOND,
    IntervalTimer,
    machine,
    one_thread_env,
    run_checked,
    store_summary,
    width,
    write_synthetic_store,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="DDP ranks")
    p.add_argument("--batch", type=int, default=8, help="utterances per batch per process")
    p.add_argument("--frames", type=int, default=400, help="frames per utterance")
    p.add_argument("--input-dim", type=int, default=80)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (also the log interval)")
    p.add_argument(
        "--repeats", type=int, default=2, help="single/DDP pairs (best of each is compared)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 2 timed steps, 1 repeat"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.frames, args.hidden_size, args.num_layers = 2, 48, 32, 1
        args.steps, args.warmup, args.repeats = 2, 1, 1
    return args


def interval_steps(args) -> tuple[int, int]:
    interval = max(1, args.warmup)
    return interval, interval + interval * -(-args.steps // interval)


def child(args) -> None:
    """One rank (or the single process): train, and rank 0 writes its steady rates to --out."""
    import torch

    from mockingjay.masking import MaskConfig
    from mockingjay.model import preset_config
    from mockingjay.trainer import TrainConfig, TrainData, Trainer

    torch.set_num_threads(args.threads)
    interval, total_steps = interval_steps(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_config = preset_config(
        "tera-base",
        input_dim=args.input_dim,
        target_dim=args.input_dim,
        num_layers=args.num_layers,
        **width(args.hidden_size),
    )
    config = TrainConfig(
        total_steps=total_steps,
        learning_rate=1e-3,
        max_frames_per_batch=args.batch * args.frames,
        max_batch_size=args.batch,
        max_length=args.frames,
        bucket_pool_size=args.batch * -(-2048 // args.batch),
        log_every=interval,
        checkpoint_every=total_steps,
        device="cpu",
        num_workers=0,
        progress=False,
    )
    timer = IntervalTimer(world_size=world_size)
    run_dir = args.out.parent / f"run-{args.out.stem}"
    trainer = Trainer(
        model_config,
        MaskConfig(span_length=7),
        config,
        TrainData(args.store),
        run_dir / "checkpoints",
        run_dir / "model",
        callback=timer,
    )
    result = trainer.fit()
    if int(os.environ.get("RANK", "0")) == 0:
        steady = timer.steady(skip=1)
        per_process_audio = steady["audio_seconds_per_second"]
        report = {
            **steady,
            "world_size": result["world_size"],
            "torch_threads": torch.get_num_threads(),
            "samples_per_second_per_process": round(
                per_process_audio * FRAMES_PER_SECOND / args.frames, 2
            ),
            "batches_per_epoch_per_rank": trainer.sampler.batches_per_epoch(0),
        }
        args.out.write_text(json.dumps(report))


def launch(args, store: Path, out: Path, nproc: int) -> dict:
    script = [str(Path(__file__).resolve()), "--child", "--store", str(store), "--out", str(out)]
    for key in (
        "batch",
        "frames",
        "input_dim",
        "hidden_size",
        "num_layers",
        "steps",
        "warmup",
        "threads",
    ):
        script += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if nproc == 1:
        command = [sys.executable] + script
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ] + script
    load_before = os.getloadavg()
    run_checked(command, env=one_thread_env())
    report = json.loads(out.read_text())
    report["loadavg"] = [round(x, 2) for x in load_before + os.getloadavg()]
    return report


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    _, total_steps = interval_steps(args)
    tmp = Path(tempfile.mkdtemp(prefix="ddp-scaling-", dir=args.tmp))
    try:
        store = tmp / "train"
        # Enough utterances that no rank reaches the end of an epoch inside a run.
        write_synthetic_store(
            store, args.batch * args.nproc * (total_steps + 1), args.frames, args.input_dim
        )
        result: dict = {
            "machine": machine(),
            "nproc": args.nproc,
            "threads_per_process": args.threads,
            "batch_per_process": args.batch,
            "frames": args.frames,
            "model": {"hidden_size": args.hidden_size, "num_layers": args.num_layers},
            "store": store_summary(store),
            "single": [],
            "ddp": [],
        }
        for r in range(args.repeats):
            result["single"].append(launch(args, store, tmp / f"single{r}.json", 1))
            result["ddp"].append(launch(args, store, tmp / f"ddp{r}.json", args.nproc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    single = max(result["single"], key=lambda r: r["samples_per_second_per_process"])
    ddp = max(result["ddp"], key=lambda r: r["samples_per_second_per_process"])
    result.update(
        best_single_samples_per_second=single["samples_per_second_per_process"],
        best_ddp_samples_per_second_per_process=ddp["samples_per_second_per_process"],
        ratio=round(
            ddp["samples_per_second_per_process"] / single["samples_per_second_per_process"], 4
        ),
        target_ratio=0.8,
        # CPU seconds per step of a rank vs the single process: below 1 only by the extra
        # work DDP adds (gradient all-reduce, gloo threads), whatever else the machine runs
        ratio_cpu_time=round(single["cpu_ms_per_step"] / ddp["cpu_ms_per_step"], 4),
    )
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
