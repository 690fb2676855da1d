"""Time Mockingjay pretraining steps and print one JSON line (docs/design.md section 7 shapes).

One step = MAM masking on the device, model forward, L1 loss on the masked frames, backward,
gradient clipping, AdamW (fused on CUDA); bf16 autocast on CUDA; features already on the device.
The host waits for the device only around the timed region, never inside a step.

    python benchmarks/pretrain_throughput.py --config base --batch 32 --frames 1500 --compile
    python benchmarks/pretrain_throughput.py --config large --compile
    python benchmarks/pretrain_throughput.py --quick          # CPU smoke run, well under a minute
    python benchmarks/pretrain_throughput.py --config base --compile --real-loop
    python benchmarks/pretrain_throughput.py --quick --real-loop

`--real-loop` also runs the real training loop (mockingjay.trainer.Trainer: memory-mapped
feature store, length bucketing, DataLoader workers, pinned memory and non-blocking copies,
masking on the device) with the same model and shapes, and prints both throughputs and their
ratio (issue 7: the real loop must sustain >= 90% of the model-only step). Without
`--features` it reads a synthetic store of B x (steps + warmup + 2) random float16 utterances of
exactly T frames written with the featurize stage's writer to a temporary folder, so every
batch is [B, T, D] as in the model-only step. The trainer's own step on batches already on the
device is timed too: real loop / that isolates the input path.

MFU follows docs/design.md section 7: per step 6 x matmul parameters x frames + 12 x layers x B x T^2 x hidden
FLOPs (T in model steps), over a bf16 peak of 790 TFLOP/s (H200 8192^3 bf16 matmul).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mockingjay.batching import FeatureDataset  # noqa: E402
from mockingjay.featstore import is_store  # noqa: E402
from mockingjay.masking import MaskConfig, mam_l1_loss, mask_batch  # noqa: E402
from mockingjay.model import (  # noqa: E402
    SDPA_PRIORITY,
    MockingjayForMAM,
    ModelConfig,
    preset_config,
    set_attention_priority,
)

# Audio seconds count 10 ms frames (the default hop), --features stores included, so that the
# model-only and real-loop figures, one synthetic and one not, compare frame for frame.
FRAMES_PER_SECOND = 100
# docs/design.md section 7: BASE is s3prl's config (3 layers, 240-d fbank+d+dd in and out, R=1) and
# LARGE the same with 12 layers.
CONFIGS = {"base": dict(num_layers=3), "large": dict(num_layers=12)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--input-dim", type=int, default=240)
    parser.add_argument("--downsample-rate", type=int, default=1)
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=None,
        help="a narrower model for smoke runs (heads H/64, FFN 4H; default 768)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile forward + loss")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (and compilation)")
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="lengths drawn from T/2..T (padding mask) instead of all T frames",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument(
        "--sdpa-order",
        default=None,
        help="comma-separated SDPBackend names overriding the model's preference "
        "(both with and without a padding mask), e.g. CUDNN_ATTENTION,MATH",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="profile one extra step and report which attention kernels ran",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CPU smoke run: batch 2, 128 frames, 2 timed steps"
    )
    real = parser.add_argument_group("real training loop (--real-loop)")
    real.add_argument(
        "--real-loop",
        action="store_true",
        help="also time mockingjay.trainer's loop reading a feature store, and the ratio",
    )
    real.add_argument(
        "--features",
        type=Path,
        default=None,
        help="a featurize output folder (its train + dev stores) or one store; "
        "default: a synthetic store of [T, input-dim] utterances",
    )
    real.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default: the trainer's own choice)",
    )
    real.add_argument("--tmp", type=Path, default=None, help="where the synthetic store goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.batch, args.frames, args.steps, args.warmup = "cpu", 2, 128, 2, 1
    return args


def step_flops(model: MockingjayForMAM, batch: int, frames: int) -> float:
    config = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    steps = -(-frames // config.downsample_rate)
    # Linear layers see steps, not frames, when R > 1: 6 FLOPs per weight per row, fwd + bwd.
    dense = 6 * matmul_params * batch * steps
    attention = 12 * config.num_layers * batch * steps**2 * config.hidden_size
    return float(dense + attention)


def make_train_step(
    model: MockingjayForMAM,
    features: torch.Tensor,
    lengths: torch.Tensor,
    model_lengths: torch.Tensor | None,
    mask_config: MaskConfig,
    compile: bool = False,
):
    """One model-only pretraining step on fixed device tensors: MAM masking on the device, forward
    (bf16 autocast on CUDA), L1 loss on the masked frames, backward, clipping at 5.0, AdamW."""
    device = features.device
    cuda = device.type == "cuda"
    downsample_rate = model.config.downsample_rate
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=2e-4,
        weight_decay=0.01,
        **({"fused": True} if cuda else {"foreach": True}),
    )

    def forward_loss(inputs, targets, loss_mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            predictions = model(inputs, model_lengths)
        return mam_l1_loss(predictions, targets, loss_mask)[0]

    if compile:
        forward_loss = torch.compile(forward_loss)

    def train_step():
        masked = mask_batch(features, lengths, mask_config, downsample_rate)
        loss = forward_loss(masked.inputs, features, masked.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return train_step


def model_config_for(args) -> ModelConfig:
    from benchlib import width

    return preset_config(
        "s3prl-base",
        input_dim=args.input_dim,
        target_dim=args.input_dim,
        downsample_rate=args.downsample_rate,
        **CONFIGS[args.config],
        **width(args.hidden_size),
    )


def mask_config_for(args) -> MaskConfig:
    return MaskConfig(span_length=7 if args.downsample_rate == 1 else 3)


def main(argv=None) -> dict:
    args = parse_args(argv)
    features_dir = None
    if args.real_loop and args.features is not None:
        features_dir = resolve_feature_stores(args.features)
        args.input_dim = FeatureDataset(features_dir).input_dim
    result = model_only(args)
    if args.real_loop:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        result["real_loop"] = real_loop(args, result, features_dir)
    print(json.dumps(result))
    return result


def model_only(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    if args.sdpa_order:
        order = args.sdpa_order.split(",")
        set_attention_priority(masked=order, unmasked=order)

    config = model_config_for(args)
    model = MockingjayForMAM(config).to(device).train()

    features = torch.randn(args.batch, args.frames, args.input_dim, device=device)
    if args.ragged:
        lengths = torch.randint(args.frames // 2, args.frames + 1, (args.batch,), device=device)
        lengths[0] = args.frames
        model_lengths = lengths
    else:
        lengths = torch.full((args.batch,), args.frames, device=device)
        model_lengths = None  # known unpadded on the host: no attention mask, flash can run
    # Throughput counts real audio only; MFU counts the work done, padding included.
    audio_seconds = lengths.sum().item() / FRAMES_PER_SECOND
    train_step = make_train_step(
        model, features, lengths, model_lengths, mask_config_for(args), args.compile
    )

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    seconds_per_step = elapsed / args.steps
    flops = step_flops(model, args.batch, args.frames)
    result = {
        "config": args.config,
        "hidden_size": config.hidden_size,
        "batch": args.batch,
        "frames": args.frames,
        "input_dim": args.input_dim,
        "downsample_rate": args.downsample_rate,
        "layers": config.num_layers,
        "compile": args.compile,
        "ragged": args.ragged,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "autocast": "bf16" if cuda else "fp32",
        "steps": args.steps,
        "warmup": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "ms_per_step": round(1000 * seconds_per_step, 2),
        "audio_seconds_per_second": round(audio_seconds / seconds_per_step, 1),
        "tflops_per_second": round(flops / seconds_per_step / 1e12, 2),
        "mfu": round(flops / seconds_per_step / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if cuda
        else None,
        "sdpa_priority": list(SDPA_PRIORITY[args.ragged]),
        "parameters": model.num_parameters(),
        "final_loss": round(loss.item(), 4),
    }
    if args.kernels:
        result["attention_kernels"] = attention_kernels(train_step)
    return result


# ----------------------------------------------------------------------------- the real loop


def resolve_feature_stores(path: Path) -> list[Path]:
    """A featurize output folder -> its train (+ dev) stores, as the pretrain stage reads; a store -> itself."""
    path = Path(path)
    if is_store(path):
        return [path]
    stores = [path / split for split in ("train", "dev") if is_store(path / split)]
    if not stores:
        raise SystemExit(
            f"{path}: neither a feature store nor a featurize output folder with train/"
        )
    return stores


def real_loop(args, model_only_result: dict, store_paths: list[Path] | None) -> dict:
    """The trainer's loop twice on one Trainer: on batches already on the device, then reading the
    store through its DataLoader; plus the loader alone. Log every `warmup` steps: the first log
    interval of each phase is warm-up (compilation, worker start-up), the others are timed."""
    from benchlib import IntervalTimer, store_summary, write_synthetic_store

    from mockingjay.trainer import TrainConfig, TrainData, Trainer

    interval = max(1, args.warmup)
    phase_steps = interval + interval * -(-args.steps // interval)
    tmp = Path(tempfile.mkdtemp(prefix="pretrain-real-loop-", dir=args.tmp))
    try:
        if store_paths is None:
            batches_in_store = phase_steps + 2  # phase B never reaches an epoch boundary
            store_paths = [tmp / "train"]
            write_synthetic_store(
                store_paths[0],
                args.batch * batches_in_store,
                args.frames,
                args.input_dim,
                min_frames=args.frames // 2 if args.ragged else None,
            )
        stores = [store_summary(p) for p in store_paths]
        dataset = FeatureDataset(store_paths)
        model_config = model_config_for(args)
        if dataset.target_dim != model_config.target_dim:
            model_config = dataclasses.replace(model_config, target_dim=dataset.target_dim)
        train_config = TrainConfig(
            total_steps=2 * phase_steps,
            learning_rate=2e-4,
            weight_decay=0.01,
            grad_clip=5.0,
            max_frames_per_batch=args.batch * args.frames,
            max_batch_size=args.batch,
            max_length=args.frames,
            bucket_pool_size=args.batch * -(-2048 // args.batch),
            log_every=interval,
            checkpoint_every=10 * phase_steps,
            device=args.device,
            compile=args.compile,
            num_workers=args.num_workers,
            progress=False,
        )
        timer = IntervalTimer()
        trainer = Trainer(
            model_config,
            mask_config_for(args),
            train_config,
            TrainData(store_paths),
            tmp / "run" / "checkpoints",
            tmp / "run" / "model",
            callback=timer,
        )
        trainer._setup()  # the benchmark drives the trainer's own loop in two phases
        device = trainer.device
        cuda = device.type == "cuda"
        loader = trainer.loader

        # Phase A: the trainer's step on the store's first batches, copied to the device once.
        trainer.sampler.set_epoch(0, 0)
        resident = []
        for batch in loader:
            resident.append(
                batch._replace(
                    inputs=batch.inputs.to(device),
                    targets=batch.targets.to(device) if batch.targets is not None else None,
                )
            )
            if len(resident) == min(8, trainer.sampler.batches_per_epoch(0)):
                break
        trainer.loader = resident
        phase_a = _phase(trainer, timer, phase_steps, cuda)
        del resident

        # Phase B: the real loop, from the start of an epoch.
        trainer.loader, trainer.epoch, trainer.batch_in_epoch = loader, 0, 0
        phase_b = _phase(trainer, timer, 2 * phase_steps, cuda)
        loader_only = _loader_only(trainer, device, phase_steps - interval)

        uniform = (
            all(s["uniform_length"] for s in stores)
            and stores[0]["frames"] // stores[0]["utterances"] == args.frames
        )
        if uniform:  # every step is [B, T]: the same FLOPs as the model-only step
            flops = step_flops(trainer.model, args.batch, args.frames)
            for phase in (phase_a, phase_b):
                phase["mfu"] = round(
                    flops / (phase["ms_per_step"] / 1000) / (args.peak_tflops * 1e12), 4
                )
        model_rate = model_only_result["audio_seconds_per_second"]
        return {
            "stores": [str(p) if args.features else "synthetic" for p in store_paths],
            "store": stores[0] if len(stores) == 1 else stores,
            "same_shapes_as_model_only": uniform and not args.ragged,
            "num_workers": trainer.loader.num_workers,
            "pin_memory": trainer.loader.pin_memory,
            "log_every": interval,
            "compile": args.compile,
            "trainer_step_device_batches": phase_a,
            "trainer_real_loop": phase_b,
            "loader_only": loader_only,
            "ratio_real_loop_vs_model_only": round(
                phase_b["audio_seconds_per_second"] / model_rate, 4
            ),
            "ratio_real_loop_vs_trainer_step": round(
                phase_b["audio_seconds_per_second"] / phase_a["audio_seconds_per_second"], 4
            ),
            "target_ratio": 0.9,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _phase(trainer, timer, stop_at: int, cuda: bool) -> dict:
    from benchlib import StopBenchmark

    timer.records, timer.stop_at = [], stop_at
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer._fit()
    except StopBenchmark:
        pass
    result = timer.steady(skip=1)
    if cuda:
        result["peak_memory_gib"] = round(
            torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2
        )
    return result


def _loader_only(trainer, device: torch.device, batches: int) -> dict:
    """The input path alone: the trainer's DataLoader (memmap read, collate, pinning) and the copy
    to the device, with no model: the most the input path can feed."""
    trainer.sampler.set_epoch(0, 0)
    frames, count, start = 0, 0, None
    for batch in trainer.loader:
        batch.inputs.to(device, non_blocking=True)
        if start is None:  # the first batch pays for the new iterator's prefetch
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            continue
        frames += int(batch.lengths.sum())
        count += 1
        if count == max(1, batches):
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "batches": count,
        "ms_per_batch": round(1000 * seconds / max(count, 1), 2),
        "audio_seconds_per_second": round(frames / FRAMES_PER_SECOND / max(seconds, 1e-9), 1),
    }


def attention_kernels(train_step) -> list[str]:
    """Names of the attention kernels one step launches (shows which SDPA backend was chosen)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    keys = ("attention", "fmha", "flash", "cudnn", "attn", "sdpa")
    names = {
        event.key for event in prof.key_averages() if any(k in event.key.lower() for k in keys)
    }
    return sorted(name[:120] for name in names)


if __name__ == "__main__":
    main()
