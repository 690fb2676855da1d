"""Shared pieces of the benchmark scripts: synthetic feature stores, steady-state timing of the
trainer's own loop, memory and load readings, child processes that answer in JSON.

Not a benchmark itself. The scripts in this folder import it as a sibling module (Python puts a
script's folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Synthetic stores are random frames with no recorded feature settings: the figures count them
# as 10 ms frames (the default hop). A featurized store records its hop; store_frame_rate reads it.
FRAMES_PER_SECOND = 100


def store_frame_rate(store) -> float:
    """Frames per second of a feature store: its recorded featurize settings, else the synthetic 100."""
    from mockingjay.feature_config import frames_per_second

    settings = store.attrs.get("feature_config")
    return frames_per_second(settings) if settings else FRAMES_PER_SECOND


def machine() -> dict:
    """What the figures were taken on: cores, torch version, load average (1, 5, 15 min)."""
    import torch

    info = {
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def width(hidden_size: int | None) -> dict:
    """ModelConfig overrides for a model `hidden_size` wide (heads of 64 dims, FFN 4x), as the
    presets are at 768; {} for None (the preset's own width)."""
    if not hidden_size:
        return {}
    return {
        "hidden_size": hidden_size,
        "num_heads": max(1, hidden_size // 64),
        "intermediate_size": 4 * hidden_size,
    }


def write_synthetic_store(
    path: Path,
    count: int,
    max_frames: int,
    dim: int,
    min_frames: int | None = None,
    seed: int = 0,
    pool: int = 32,
) -> dict:
    """A float16 feature store of `count` random utterances written with the featurize stage's writer.

    Lengths are all `max_frames` (min_frames None) or uniform in [min_frames, max_frames]. The
    rows are crops of a pool of `pool` random utterances, so writing a store of gigabytes costs
    no more than a copy; the trainer does not care what the numbers are.
    """
    from mockingjay.featstore import RaggedWriter

    rng = np.random.default_rng(seed)
    source = rng.standard_normal((pool, max_frames, dim), dtype=np.float32).astype(np.float16)
    if min_frames is None:
        lengths = np.full(count, max_frames, dtype=np.int64)
    else:
        lengths = rng.integers(min_frames, max_frames + 1, count)
    with RaggedWriter(path, dim, "float16", {"synthetic": True, "seed": seed}) as writer:
        for i, length in enumerate(lengths.tolist()):
            writer.append(f"synthetic_{i:07d}", source[i % pool, :length])
    return store_summary(path)


def repeat_store(source_paths: list[Path], path: Path, times: int) -> dict:
    """A store holding every utterance of `source_paths`, `times` times over (ids suffixed _xK)."""
    from mockingjay.featstore import RaggedArray, RaggedWriter

    sources = [RaggedArray(p) for p in source_paths]
    with RaggedWriter(
        path,
        sources[0].dim,
        "float16",
        {"repeat_of": [str(p) for p in source_paths], "times": times},
    ) as writer:
        for k in range(times):
            for store in sources:
                for item_id, rows in zip(store.ids, store):
                    writer.append(f"{item_id}_x{k}", rows)
    return store_summary(path)


def store_summary(path: Path) -> dict:
    from mockingjay.featstore import RaggedArray

    store = RaggedArray(path)
    frames = int(store.lengths.sum())
    return {
        "utterances": len(store),
        "frames": frames,
        "dim": store.dim,
        "audio_hours": round(frames / store_frame_rate(store) / 3600, 4),
        "bytes": int(store.data.nbytes),  # the data file's size (RaggedArray checks it)
        "uniform_length": bool(len(store) and store.lengths.min() == store.lengths.max()),
    }


class StopBenchmark(Exception):
    """Raised from the trainer's callback to end a timed phase without its final checkpoint."""


class IntervalTimer:
    """The trainer's callback: times its log intervals (rank 0), optionally stops it at a step.

    The trainer reports each interval's audio-seconds/second at every log step (a point where
    it reads the device anyway). The wall time between two log records times one interval, so
    intervals after the first (compilation, worker start-up, first allocations) give the steady
    rate of the real loop, measured by the loop itself.
    """

    def __init__(self, stop_at: int | None = None, world_size: int = 1):
        self.stop_at, self.world_size = stop_at, world_size
        self.records: list[
            tuple[float, float, dict]
        ] = []  # (wall, CPU seconds of this process, record)
        self.started = (time.perf_counter(), time.process_time())

    def __call__(self, record: dict) -> None:
        if record.get("event") != "train":
            return
        self.records.append((time.perf_counter(), time.process_time(), record))
        if self.stop_at is not None and record["step"] >= self.stop_at:
            raise StopBenchmark

    def steady(self, skip: int = 1) -> dict:
        """Rate over the intervals after the first `skip` ones (needs at least skip + 1 records)."""
        if len(self.records) <= skip:
            raise RuntimeError(
                f"{len(self.records)} log intervals, need more than {skip} to time a steady state"
            )
        t0, cpu0, first = self.records[skip - 1] if skip else (*self.started, {"step": 0})
        timed = self.records[skip:]
        seconds, audio, previous = 0.0, 0.0, t0
        for t, _, record in timed:
            audio += record["audio_seconds_per_second"] * (t - previous)
            seconds += t - previous
            previous = t
        steps = timed[-1][2]["step"] - first["step"]
        total = audio / seconds  # summed over ranks by the trainer
        return {
            "steps_timed": steps,
            "seconds_timed": round(seconds, 4),
            "ms_per_step": round(1000 * seconds / steps, 2),
            # CPU time of this process (all its threads): more than ms_per_step x threads means
            # extra work, less means waiting (for the device, other ranks or a busy machine)
            "cpu_ms_per_step": round(1000 * (timed[-1][1] - cpu0) / steps, 2),
            "audio_seconds_per_second": round(total / self.world_size, 1),
            "audio_seconds_per_second_all_ranks": round(total, 1),
            "final_loss": round(timed[-1][2]["loss"], 4),
        }


def memory_mb() -> dict:
    """Peak and current resident memory of this process, split into anonymous and file-backed
    (a memory-mapped store's pages count as file-backed: the kernel can drop them)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "peak_rss_mb": round(peak, 1),
        "rss_mb": round(fields.get("VmRSS", 0.0), 1),
        "rss_anon_mb": round(fields.get("RssAnon", 0.0), 1),
        "rss_file_mb": round(fields.get("RssFile", 0.0), 1),
    }


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_checked(
    command: list[str], env: dict | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run a child command from the repository root (importable), stop naming it if it fails."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    full_env.update(env or {})
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"child failed ({' '.join(command)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_json(command: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run a child command and parse the JSON object it prints (its whole stdout, or the last line)."""
    stdout = run_checked(command, env, timeout).stdout
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return json.loads(stdout.strip().splitlines()[-1])


def one_thread_env() -> dict:
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
