"""How much pretraining does it take for every layer to beat log-mel on the linear phone probe?

Pretrains one model on the featurized corpus (`data/features`, made by `dvc repro featurize`),
keeping a checkpoint every `--probe-every` steps, then probes each checkpoint's layers (online
mode: the frozen model runs on the fly; phone and speaker probes, log-mel baseline included).
Prints one JSON line per probed checkpoint. Needs no MLflow or DVC, so it runs on a bare GPU box:

    python benchmarks/train_length_probe.py --steps 3000 --probe-every 1000          # GPU
    python benchmarks/train_length_probe.py --quick                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import store_frame_rate  # noqa: E402

from mockingjay.checkpoint import list_checkpoints, load_model_dir  # noqa: E402
from mockingjay.featstore import RaggedArray  # noqa: E402
from mockingjay.masking import MASK_PRESETS  # noqa: E402
from mockingjay.model import preset_config  # noqa: E402
from mockingjay.probe_heads import ProbeConfig  # noqa: E402
from mockingjay.probe_online import probe_online  # noqa: E402
from mockingjay.probe_plan import read_utterances  # noqa: E402
from mockingjay.store_layout import SPLITS, labels_store, utterances_table  # noqa: E402
from mockingjay.trainer import TrainConfig, TrainData, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=Path, default=ROOT / "data" / "features")
    parser.add_argument("--preset", default="tera-base")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--probe-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--frames-per-batch", type=int, default=12000)
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, CPU")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.heads, args.ffn, args.steps, args.probe_every, args.probe_epochs = (
            32,
            2,
            64,
            6,
            3,
            2,
        )
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    model_config = preset_config(
        args.preset, hidden_size=args.hidden, num_heads=args.heads, intermediate_size=args.ffn
    )
    train_config = TrainConfig(
        total_steps=args.steps,
        learning_rate=args.lr,
        max_frames_per_batch=args.frames_per_batch,
        max_length=1500,
        log_every=max(1, args.steps // 10),
        checkpoint_every=args.probe_every,
        keep_checkpoints=1000,
        device=device,
        progress=False,
    )
    features = {split: RaggedArray(args.features / split) for split in SPLITS}
    labels = {split: RaggedArray(labels_store(args.features, split)) for split in SPLITS}
    speakers = {u: i.speaker for u, i in read_utterances(utterances_table(args.features)).items()}
    phone = ProbeConfig(epochs=args.probe_epochs, batch_size=1024)
    speaker = ProbeConfig(epochs=300, batch_size=0, learning_rates=(1e-2,))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(
            model_config,
            MASK_PRESETS[args.preset],
            train_config,
            TrainData(
                [args.features / "train", args.features / "dev"],
                args.features / "test",
                frame_rate=store_frame_rate(features["train"]),
            ),
            Path(tmp) / "checkpoints",
            Path(tmp) / "model",
            callback=lambda r: (
                print(json.dumps(r), file=sys.stderr) if r.get("event") == "train" else None
            ),
        )
        print(
            json.dumps(
                {
                    "event": "pretrained",
                    "seconds": round(time.perf_counter() - started, 1),
                    **{
                        k: result[k]
                        for k in (
                            "steps",
                            "heldout_loss_initial",
                            "heldout_loss_final",
                            "audio_seconds_per_second",
                            "device",
                            "precision",
                            "num_parameters",
                        )
                    },
                }
            ),
            flush=True,
        )
        for step, path in list_checkpoints(Path(tmp) / "checkpoints"):
            model, _ = load_model_dir(path, device=device)
            started = time.perf_counter()
            probed = probe_online(
                model,
                features,
                labels,
                speakers,
                device=device,
                phone_config=phone,
                speaker_config=speaker,
                progress=False,
            )
            print(
                json.dumps(
                    {
                        "event": "probe",
                        "step": step,
                        "seconds": round(time.perf_counter() - started, 1),
                        "phone": {
                            k: round(v["accuracy"], 4) for k, v in probed["phone"]["layers"].items()
                        },
                        "speaker": {
                            k: round(v["accuracy"], 4)
                            for k, v in probed["speaker"]["layers"].items()
                        },
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
