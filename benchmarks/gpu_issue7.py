"""Issue 7's GPU measurements as one prepared run: every figure the CPU machine cannot take.

    python3 benchmarks/gpu_issue7.py --out "$OUT"           # on the GPU machine, about 6-9 minutes

Runs, most important first, each a fresh process under a time limit, while the budget lasts:

    real_loop_base_compiled    pretrain_throughput.py --config base --compile --real-loop
    extract_base               extract_throughput.py (BASE, 1,000 synthetic utterances, all layers, --write)
    real_loop_large_compiled   pretrain_throughput.py --config large --compile --real-loop
    real_loop_base_eager       pretrain_throughput.py --config base --real-loop
    large_compiled_flash       pretrain_throughput.py --config large --compile --sdpa-order FLASH_ATTENTION,...

and writes two files under --out: issue7_gpu.jsonl (one object per run: name, command, return
code, seconds, the script's JSON) and issue7_gpu.log (each run's stderr). Record the device
(in every JSON) and the commit beside the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    (
        "real_loop_base_compiled",
        ["pretrain_throughput.py", "--config", "base", "--compile", "--real-loop"],
    ),
    ("extract_base", ["extract_throughput.py", "--write"]),
    (
        "real_loop_large_compiled",
        ["pretrain_throughput.py", "--config", "large", "--compile", "--real-loop"],
    ),
    ("real_loop_base_eager", ["pretrain_throughput.py", "--config", "base", "--real-loop"]),
    # LARGE missed 4,800 audio-s/s by 1.4% with cuDNN attention: is FlashAttention-2 faster here?
    (
        "large_compiled_flash",
        [
            "pretrain_throughput.py",
            "--config",
            "large",
            "--compile",
            "--sdpa-order",
            "FLASH_ATTENTION,EFFICIENT_ATTENTION,MATH",
        ],
    ),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all runs together")
    p.add_argument("--limit", type=float, default=240.0, help="seconds for one run at most")
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument(
        "--smoke", action="store_true", help="check this script on a CPU: --quick runs, no compile"
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if args.only is None or r[0] in args.only.split(",")]
    start = time.monotonic()
    with (
        open(args.out / "issue7_gpu.jsonl", "a") as results,
        open(args.out / "issue7_gpu.log", "a") as log,
    ):
        for name, command in runs:
            left = args.budget - (time.monotonic() - start)
            if left < 60:
                print(f"{name}: skipped, {left:.0f} s of the budget left", flush=True)
                results.write(json.dumps({"name": name, "skipped": "budget"}) + "\n")
                continue
            if args.smoke:
                command = [c for c in command if c != "--compile"] + ["--quick"]
            full = [sys.executable, str(HERE / command[0]), *command[1:]]
            began = time.monotonic()
            try:
                proc = subprocess.run(
                    full, capture_output=True, text=True, timeout=min(args.limit, left), check=False
                )
                rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as err:
                rc, stdout, stderr = "timeout", err.stdout or "", err.stderr or ""
                stdout, stderr = (
                    s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr)
                )
            seconds = round(time.monotonic() - began, 1)
            try:
                output = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None
            except json.JSONDecodeError:
                output = None
            record = {
                "name": name,
                "command": " ".join(command),
                "rc": rc,
                "seconds": seconds,
                "result": output,
            }
            results.write(json.dumps(record) + "\n")
            results.flush()
            log.write(f"===== {name} rc={rc} {seconds}s\n{stderr[-20000:]}\n")
            log.flush()
            print(f"{name}: rc={rc} {seconds}s {summary(name, output)}", flush=True)


def summary(name: str, output: dict | None) -> str:
    if not output:
        return "no JSON"
    if name.startswith("extract"):
        return (
            f"encode {output['encode_batches']['audio_seconds_per_second']} audio-s/s, forward only "
            f"{output['model_forward_device_batches']['audio_seconds_per_second']}, to host "
            f"{output['encode_batches_to_host']['audio_seconds_per_second']}, device {output['device']}"
        )
    real = output.get("real_loop", {})
    return (
        f"model-only {output['audio_seconds_per_second']} audio-s/s (MFU {output['mfu']}), real loop "
        f"{real.get('trainer_real_loop', {}).get('audio_seconds_per_second')} (ratio "
        f"{real.get('ratio_real_loop_vs_model_only')}), trainer step on device batches "
        f"{real.get('trainer_step_device_batches', {}).get('audio_seconds_per_second')}, loader alone "
        f"{real.get('loader_only', {}).get('audio_seconds_per_second')}, device {output['device']}"
    )


if __name__ == "__main__":
    main()
