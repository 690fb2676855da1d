"""Time extraction with the frozen encoder (mockingjay.extract) and print one JSON object.

What the extract stage runs: utterances batched longest-first under a cap of padded frames
(`length_sorted_batches`), each batch padded on the host, pinned and copied to the device, the
encoder in eval mode under `torch.inference_mode` (bf16 autocast on CUDA, fp32 on CPU), every
requested hidden state cast to float16 (`encode_batches`). Measured, in audio-s/s (100 frames/s):

    model_forward_device_batches   the encoder alone on batches already on the device (ceiling)
    encode_batches                 the extraction path above; states stay on the device (what
                                   online probing consumes): the issue-7 figure, >= 50,000 on a GPU
    encode_batches_to_host         the same plus every state copied back to host memory
    host_batch_assembly            padding batches from the memory map alone (the host's share)
    extract_to_disk (--write)      extract_representations: float16 stores written to a temp folder

    python benchmarks/extract_throughput.py                      # BASE (s3prl-base, 240-d), synthetic store
    python benchmarks/extract_throughput.py --features data/features/test --input-dim 80
    python benchmarks/extract_throughput.py --quick              # CPU smoke run, a few seconds

Without `--features` the store is synthetic: `--utterances` random float16 utterances with
lengths uniform in [frames/2, frames], written with the featurize stage's writer to a temporary
folder. Each figure is the best of `--passes` full passes over the store after one warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine, store_frame_rate, store_summary, width, write_synthetic_store
from pretrain_throughput import CONFIGS  # BASE 3 layers, LARGE 12: the same models

from mockingjay.device import autocast
from mockingjay.extract import (
    encode_batches,
    extract_representations,
    length_sorted_batches,
    padded_batch,
    resolve_layers,
)
from mockingjay.featstore import RaggedArray
from mockingjay.model import MockingjayForMAM, preset_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="base")
    p.add_argument("--input-dim", type=int, default=240)
    p.add_argument(
        "--hidden-size", type=int, default=None, help="narrower model (heads H/64, FFN 4H)"
    )
    p.add_argument(
        "--features", type=Path, default=None, help="a feature store (default: synthetic)"
    )
    p.add_argument("--utterances", type=int, default=1000, help="synthetic store size")
    p.add_argument("--frames", type=int, default=1500, help="longest synthetic utterance")
    p.add_argument(
        "--batch-frames",
        type=int,
        default=32000,
        help="padded frames per forward pass (params.yaml)",
    )
    p.add_argument("--layers", default="all", help="'all' or comma-separated hidden-state indices")
    p.add_argument(
        "--no-input", action="store_true", help="do not emit the input features as a store"
    )
    p.add_argument(
        "--passes", type=int, default=3, help="timed passes over the store (best is reported)"
    )
    p.add_argument("--write", action="store_true", help="also time extract_representations to disk")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke run: small model, 24 short utterances"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.utterances, args.frames, args.batch_frames, args.passes = (
            "cpu",
            24,
            96,
            480,
            1,
        )
        args.hidden_size = args.hidden_size or 64
        args.write = True
    return args


def timed_passes(fn, passes: int, sync) -> dict:
    """One warm-up call, then `passes` timed calls (each followed by a device sync)."""
    fn()
    sync()
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return {"best_sec": round(min(seconds), 4), "median_sec": round(statistics.median(seconds), 4)}


def with_rate(result: dict, audio_sec: float) -> dict:
    result["audio_seconds_per_second"] = round(audio_sec / max(result["best_sec"], 1e-9), 1)
    result["audio_seconds_per_second_median"] = round(
        audio_sec / max(result["median_sec"], 1e-9), 1
    )
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=args.tmp))
    try:
        if args.features is None:
            store_path = tmp / "features"
            write_synthetic_store(
                store_path,
                args.utterances,
                args.frames,
                args.input_dim,
                min_frames=max(1, args.frames // 2),
            )
        else:
            store_path = args.features
        store = RaggedArray(store_path)
        config = preset_config(
            "s3prl-base",
            input_dim=store.dim,
            target_dim=store.dim,
            **CONFIGS[args.config],
            **width(args.hidden_size),
        )
        model = MockingjayForMAM(config).to(device).eval()
        encoder = model.encoder
        layers = resolve_layers(
            None if args.layers == "all" else [int(x) for x in args.layers.split(",")],
            config.num_layers,
        )
        batches = length_sorted_batches(store.lengths, args.batch_frames)
        frame_rate = store_frame_rate(
            store
        )  # a --features store's own hop; synthetic: 10 ms frames
        audio_sec = float(store.lengths.sum()) / frame_rate
        include_input = not args.no_input
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def assemble():
            for indices in batches:
                padded_batch(store, indices, store.lengths[indices], torch.device("cpu"))

        resident = [
            (
                padded_batch(store, idx, store.lengths[idx], device),
                torch.from_numpy(store.lengths[idx].astype(np.int64)).to(device),
            )
            for idx in batches
        ]

        def forward_resident():
            with torch.inference_mode(), autocast(device):
                for features, lengths in resident:
                    encoder.extract_features(features, lengths, layers=layers)

        def encode(to_host: bool):
            for batch in encode_batches(model, store, batches, layers, device, include_input):
                if to_host:  # what extract_representations does before writing
                    for states in batch.states.values():
                        states.cpu()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = {
            "config": args.config,
            "layers_in_model": config.num_layers,
            "hidden_size": config.hidden_size,
            "input_dim": store.dim,
            "layers_emitted": layers,
            "input_emitted": include_input,
            "batch_frames": args.batch_frames,
            "batches": len(batches),
            "store": {
                "path": str(args.features) if args.features else "synthetic",
                **store_summary(store_path),
            },
            "audio_sec": round(audio_sec, 1),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "autocast": "bf16" if cuda else "fp32",
            "passes": args.passes,
            "machine": machine(),
        }
        result["model_forward_device_batches"] = with_rate(
            timed_passes(forward_resident, args.passes, sync), audio_sec
        )
        resident.clear()  # free the device copies before the extraction path runs
        result["encode_batches"] = with_rate(
            timed_passes(lambda: encode(False), args.passes, sync), audio_sec
        )
        result["encode_batches_to_host"] = with_rate(
            timed_passes(lambda: encode(True), args.passes, sync), audio_sec
        )
        result["host_batch_assembly"] = with_rate(
            timed_passes(assemble, args.passes, lambda: None), audio_sec
        )
        if args.write:
            summary = extract_representations(
                model,
                store,
                tmp / "representations",
                layers,
                device,
                args.batch_frames,
                include_input,
                progress=False,
                frame_rate=frame_rate,
            )
            result["extract_to_disk"] = {
                k: summary[k] for k in ("seconds", "audio_seconds_per_second", "bytes_written")
            }
            result["extract_to_disk"]["note"] = "one pass, first write of the files"
        result["audio_seconds_per_second"] = result["encode_batches"]["audio_seconds_per_second"]
        result["target_audio_seconds_per_second_gpu"] = 50000
        result["peak_memory_gib"] = (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
        )
        result["machine"]["loadavg_after"] = machine()["loadavg"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
