"""Cost of probing every layer vs one layer, extracted mode; print one JSON object.

Two measurements, on the pipeline's outputs (data/representations, data/features, the probe
section of params.yaml):

* compute: `probe_phones` + `probe_speakers` in this process (stores opened, heads trained on
  train, chosen on dev, scored on test), for one layer and for all stores (log-mel input +
  every hidden state), best of `--runs`;
* command: the whole `mockingjay probe --layer N` vs `--layer all` as a user runs it (fresh
  process: imports, data loading, MLflow logging to a throw-away SQLite store), alternated so
  that load from other jobs hits both alike, best and median of `--runs`.

    python benchmarks/probe_layers.py               # after `dvc repro` (or `dvc repro extract`)
    python benchmarks/probe_layers.py --layer 1 --runs 5
    python benchmarks/probe_layers.py --skip-command   # compute only
    python benchmarks/probe_layers.py --end-to-end     # also extract + probe, one layer vs all

In extracted mode the heads' training grows with the total width probed (every layer's heads need
their own matmuls); what is shared is the pass over the data. `--end-to-end` counts what a user
pays to probe a layer from a trained model: `mockingjay extract` of that layer (params
`extract.layers`, into a temporary folder) then `mockingjay probe`, against extracting and
probing all layers.

The ratio all / one is what issue 4 bounds (at most 2x). `--data` points at another checkout's
outputs, so an older commit's code can be timed on the same data (run this file from that
checkout with `--data` set to this one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mockingjay.config import from_section, load_params  # noqa: E402
from mockingjay.featstore import RaggedArray  # noqa: E402
from mockingjay.probe import probe_phones  # noqa: E402
from mockingjay.probe_plan import read_utterances  # noqa: E402
from mockingjay.probe_stores import open_representations  # noqa: E402
from mockingjay.probe_utterance import probe_speakers  # noqa: E402
from mockingjay.store_layout import SPLITS, utterances_table  # noqa: E402
from stages.probe_params import ProbeStageConfig  # noqa: E402


def compute_seconds(
    data: Path, layers: list[int] | None, include_input: bool, config: ProbeStageConfig
) -> dict:
    reps = open_representations(
        data / "data/representations", layers=layers, include_input=include_input
    )
    labels = {split: RaggedArray(data / "data/features/labels" / split) for split in SPLITS}
    speakers = {
        u: i.speaker for u, i in read_utterances(utterances_table(data / "data/features")).items()
    }
    started = time.perf_counter()
    phone = probe_phones(reps, labels, config.phone.training(), progress=False)
    middle = time.perf_counter()
    speaker = probe_speakers(reps, speakers, config.speaker.training(), progress=False)
    ended = time.perf_counter()
    return {
        "phone_s": middle - started,
        "speaker_s": ended - middle,
        "total_s": ended - started,
        "stores": list(reps["train"]),
        "phone_accuracy": {k: round(v["accuracy"], 4) for k, v in phone["layers"].items()},
        "speaker_accuracy": {k: round(v["accuracy"], 4) for k, v in speaker["layers"].items()},
    }


def command_seconds(data: Path, layer: str, store: Path) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "probe",
            "--layer",
            layer,
            "--params",
            str(data / "params.yaml"),
            "--representations",
            str(data / "data/representations"),
            "--features",
            str(data / "data/features"),
            "--model",
            str(data / "models/pretrain/model"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def end_to_end_seconds(data: Path, layer: str, tmp: Path, store: Path) -> float:
    """`mockingjay extract` (only `layer`, or all) into `tmp`, then `mockingjay probe` on it."""
    import shutil

    import yaml

    params = yaml.safe_load((data / "params.yaml").read_text())
    params["extract"]["layers"] = None if layer == "all" else [int(layer)]
    params_file, out = tmp / f"params_{layer}.yaml", tmp / f"representations_{layer}"
    params_file.write_text(yaml.safe_dump(params))
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "extract",
            "--params",
            str(params_file),
            "--model",
            str(data / "models/pretrain/model"),
            "--features",
            str(data / "data/features"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "probe",
            "--layer",
            layer,
            "--params",
            str(params_file),
            "--representations",
            str(out),
            "--features",
            str(data / "data/features"),
            "--model",
            str(data / "models/pretrain/model"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


def summary(values: list[float]) -> dict:
    return {
        "best": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "all": [round(v, 2) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT, help="repo whose pipeline outputs are probed"
    )
    parser.add_argument("--layer", type=int, default=3, help="the single layer to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-command", action="store_true")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time extract + probe, one layer vs all"
    )
    args = parser.parse_args()
    config = from_section(
        ProbeStageConfig, load_params(args.data / "params.yaml")["probe"], "probe"
    )
    result: dict = {
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
        "layer": args.layer,
        "code": str(ROOT),
        "data": str(args.data),
    }
    one, every = [], []
    for _ in range(args.runs):
        one.append(compute_seconds(args.data, [args.layer], False, config))
        every.append(compute_seconds(args.data, None, True, config))
    result["compute"] = {
        "one": {k: summary([r[k] for r in one]) for k in ("phone_s", "speaker_s", "total_s")},
        "all": {k: summary([r[k] for r in every]) for k in ("phone_s", "speaker_s", "total_s")},
        "stores_all": every[0]["stores"],
        "ratio_best": round(min(r["total_s"] for r in every) / min(r["total_s"] for r in one), 2),
        "accuracy_all": {
            "phone": every[0]["phone_accuracy"],
            "speaker": every[0]["speaker_accuracy"],
        },
    }
    if not args.skip_command:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "mlflow.db"
            times: dict[str, list[float]] = {"one": [], "all": []}
            for _ in range(args.runs):
                times["one"].append(command_seconds(args.data, str(args.layer), store))
                times["all"].append(command_seconds(args.data, "all", store))
        result["command"] = {k: summary(v) for k, v in times.items()}
        result["command"]["ratio_best"] = round(min(times["all"]) / min(times["one"]), 2)
        result["command"]["ratio_median"] = round(
            statistics.median(times["all"]) / statistics.median(times["one"]), 2
        )
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            times = {"one": [], "all": []}
            for _ in range(args.runs):
                times["one"].append(
                    end_to_end_seconds(args.data, str(args.layer), Path(tmp), Path(tmp) / "m.db")
                )
                times["all"].append(
                    end_to_end_seconds(args.data, "all", Path(tmp), Path(tmp) / "m.db")
                )
        result["extract_and_probe"] = {k: summary(v) for k, v in times.items()}
        result["extract_and_probe"]["ratio_best"] = round(min(times["all"]) / min(times["one"]), 2)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
