"""Time Mockingjay pretraining steps and print one JSON line (DESIGN.md section 4 shapes).

One step = MAM masking on the device, model forward, L1 loss on the masked frames, backward,
gradient clipping, AdamW (fused on CUDA); bf16 autocast on CUDA; features already on the device.
The host waits for the device only around the timed region, never inside a step.

    python benchmarks/pretrain_throughput.py --config base --batch 32 --frames 1500 --compile
    python benchmarks/pretrain_throughput.py --config large --compile
    python benchmarks/pretrain_throughput.py --quick          # CPU smoke run, well under a minute

MFU follows DESIGN.md: per step 6 x matmul parameters x frames + 12 x layers x B x T^2 x hidden
FLOPs (T in model steps), over a bf16 peak of 790 TFLOP/s (H200 8192^3 bf16 matmul).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mockingjay.masking import MaskConfig, mam_l1_loss, mask_batch  # noqa: E402
from mockingjay.model import (  # noqa: E402
    SDPA_PRIORITY, MockingjayForMAM, preset_config, set_attention_priority)

FRAMES_PER_SECOND = 100  # 10 ms hop
# DESIGN section 4: BASE is s3prl's config (3 layers, 240-d fbank+d+dd in and out, R=1) and
# LARGE the same with 12 layers.
CONFIGS = {"base": dict(num_layers=3), "large": dict(num_layers=12)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--input-dim", type=int, default=240)
    parser.add_argument("--downsample-rate", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile forward + loss")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (and compilation)")
    parser.add_argument("--ragged", action="store_true",
                        help="lengths drawn from T/2..T (padding mask) instead of all T frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--sdpa-order", default=None,
                        help="comma-separated SDPBackend names overriding the model's preference "
                             "(both with and without a padding mask), e.g. CUDNN_ATTENTION,MATH")
    parser.add_argument("--kernels", action="store_true",
                        help="profile one extra step and report which attention kernels ran")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: batch 2, 128 frames, 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.batch, args.frames, args.steps, args.warmup = "cpu", 2, 128, 2, 1
    return args


def step_flops(model: MockingjayForMAM, batch: int, frames: int) -> float:
    config = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear))
    steps = -(-frames // config.downsample_rate)
    # Linear layers see steps, not frames, when R > 1: 6 FLOPs per weight per row, fwd + bwd.
    dense = 6 * matmul_params * batch * steps
    attention = 12 * config.num_layers * batch * steps ** 2 * config.hidden_size
    return float(dense + attention)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    if args.sdpa_order:
        order = args.sdpa_order.split(",")
        set_attention_priority(masked=order, unmasked=order)

    config = preset_config("s3prl-base", input_dim=args.input_dim, target_dim=args.input_dim,
                           downsample_rate=args.downsample_rate, **CONFIGS[args.config])
    mask_config = MaskConfig(span_length=7 if args.downsample_rate == 1 else 3)
    model = MockingjayForMAM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01,
                                  **({"fused": True} if cuda else {"foreach": True}))

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

    def forward_loss(inputs, targets, loss_mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            predictions = model(inputs, model_lengths)
        return mam_l1_loss(predictions, targets, loss_mask)[0]

    if args.compile:
        forward_loss = torch.compile(forward_loss)

    def train_step():
        masked = mask_batch(features, lengths, mask_config, args.downsample_rate)
        loss = forward_loss(masked.inputs, features, masked.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

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
        "config": args.config, "batch": args.batch, "frames": args.frames,
        "input_dim": args.input_dim, "downsample_rate": args.downsample_rate,
        "layers": config.num_layers, "compile": args.compile, "ragged": args.ragged,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "autocast": "bf16" if cuda else "fp32",
        "steps": args.steps, "warmup": args.warmup, "warmup_s": round(warmup_s, 2),
        "ms_per_step": round(1000 * seconds_per_step, 2),
        "audio_seconds_per_second": round(audio_seconds / seconds_per_step, 1),
        "tflops_per_second": round(flops / seconds_per_step / 1e12, 2),
        "mfu": round(flops / seconds_per_step / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if cuda else None,
        "sdpa_priority": list(SDPA_PRIORITY[args.ragged]),
        "parameters": model.num_parameters(), "final_loss": round(loss.item(), 4),
    }
    if args.kernels:
        result["attention_kernels"] = attention_kernels(train_step)
    print(json.dumps(result))
    return result


def attention_kernels(train_step) -> list[str]:
    """Names of the attention kernels one step launches (shows which SDPA backend was chosen)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    keys = ("attention", "fmha", "flash", "cudnn", "attn", "sdpa")
    names = {event.key for event in prof.key_averages()
             if any(k in event.key.lower() for k in keys)}
    return sorted(name[:120] for name in names)


if __name__ == "__main__":
    main()
