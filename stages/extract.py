"""extract: per-layer representations of every split, for the probes.

Output directory::

    representations/{train,dev,test}/input        the log-mel input (the probes' baseline row)
    representations/{train,dev,test}/layer_00     hidden state 0: the input representation
    representations/{train,dev,test}/layer_NN     the output of encoder layer NN

float16 ragged stores (featstore.py) in the same item order as the features and at the feature
frame rate (steps repeated R times for R > 1), so they line up with the frame labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mockingjay.config import to_flat_dict
from mockingjay.featstore import RaggedArray
from mockingjay.feature_config import frames_per_second
from mockingjay.store_layout import SPLITS

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    cli_errors,
    write_json,
)
from .runtime import check_model_features, extract_config, resolve_device, window_frames


def totals(summaries: dict[str, dict], layers: list[int], frame_rate: float) -> dict:
    """The run's figures over all splits; audio seconds count frames at the features' own rate."""
    total = {
        "utterances": sum(s["items"] for s in summaries.values()),
        "frames": sum(s["frames"] for s in summaries.values()),
        "layers": len(layers),
        "bytes_written": sum(s["bytes_written"] for s in summaries.values()),
        "seconds": round(sum(s["seconds"] for s in summaries.values()), 3),
    }
    total["audio_seconds_per_second"] = round(
        total["frames"] / frame_rate / max(total["seconds"], 1e-9), 1
    )
    return total


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    model: Path = typer.Option(
        Path("models/pretrain/model"), help="model directory (model.safetensors + config.json)"
    ),
    features: Path = typer.Option(Path("data/features"), help="featurize stage output"),
    out: Path = typer.Option(Path("data/representations"), help="output directory"),
    metrics: Path = typer.Option(
        None, "--metrics", help="write the run's totals JSON here; default: none"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace --out even if this stage did not make it"
    ),
) -> None:
    """Run the frozen model over every split and store each layer's representations (float16)."""
    config = extract_config(params)
    check_output_dir(out, "extract", force, inputs=[params, model, features])
    check_output_file(metrics, "--metrics")
    from mockingjay.checkpoint import load_encoder_dir
    from mockingjay.extract import ExtractError, extract_representations, resolve_layers

    device = resolve_device(config.device)
    frame_rate = frames_per_second(check_model_features(model, features))
    stores = {split: RaggedArray(features / split, finite=True) for split in SPLITS}
    network, model_config = load_encoder_dir(model, device=device)  # pretrained or fine-tuned
    try:
        layers = resolve_layers(config.layers, model_config.num_layers)
    except ExtractError as err:
        raise StageError(f"extract.layers: {err}") from err
    window = window_frames(config, model_config.downsample_rate)
    summaries = {}
    with (
        tracking.stage_run("extract", {**to_flat_dict(config), "model": str(model)}) as mlflow,
        atomic_output_dir(out, "extract", force) as tmp,
    ):
        for split in SPLITS:
            print(f"extract: {split} ({len(stores[split])} utterances)", file=sys.stderr)
            summaries[split] = extract_representations(
                network,
                stores[split],
                tmp / split,
                layers,
                device,
                config.batch_frames,
                include_input=True,
                frame_rate=frame_rate,
                window_frames=window,
            )
        total = totals(summaries, layers, frame_rate)
        # content only (no seconds, no device): a redo elsewhere gives a byte-identical output folder
        run_facts = ("seconds", "audio_seconds_per_second", "device")
        timeless = {
            split: {k: v for k, v in part.items() if k not in run_facts}
            for split, part in summaries.items()
        }
        write_json(
            tmp / "summary.json",
            {"total": {k: v for k, v in total.items() if k not in run_facts}, "splits": timeless},
        )
        mlflow.log_metrics({k: float(v) for k, v in total.items()})
        mlflow.log_artifact(str(tmp / "summary.json"))
    if metrics:
        write_json(metrics, total)
    print(
        f"extract: {total['utterances']} utterances, {len(layers)} layers + input, "
        f"{total['bytes_written'] / 1e6:.1f} MB written at {total['audio_seconds_per_second']:.0f} audio-s/s -> {out}",
        file=sys.stderr,
    )
