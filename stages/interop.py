"""import-checkpoint / export-checkpoint: s3prl and original-Mockingjay checkpoints in and out.

`mockingjay import-checkpoint SRC DEST` reads an s3prl (`Transformer`, `SpecHead`,
`Upstream_Config`, ...) or original Mockingjay (`Mockingjay`, `Settings`, ...) file without
executing anything in it (mockingjay/safe_load.py) and writes a model directory (model.safetensors
+ config.json) that `mockingjay probe --checkpoint DEST` and `extract --model DEST` read. The
config.json holds the model, the feature settings when the file has them (checked by probe and
extract against the features they are fed), the masking record, and an "import" section with
every source field that was not mapped, what was ignored, and the source config itself.

`mockingjay export-checkpoint SRC DEST` writes one of our model directories in s3prl's layout
(`--layout s3prl`, what s3prl/upstream/mockingjay loads) or the original code's
(`--layout mockingjay`, needed for frame stacking R > 1). Neither command is a DVC stage; each
run is logged to MLflow like the stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from . import tracking
from .common import StageError, check_inputs_apart, check_writable, cli_errors
from .runtime import FEATURE_KEYS

# What a torch checkpoint starts with: a zip archive (torch >= 1.6) or a pickle's PROTO opcode
# (the legacy format, protocol 2 and up).
_ZIP_MAGIC = b"PK\x03\x04"


def check_checkpoint_file(src: Path) -> None:
    """Before torch is imported (seconds): a missing, empty or plainly foreign file is named now."""
    if not src.exists():
        raise StageError(f"{src}: not found")
    if not src.is_file():
        raise StageError(f"{src}: not a file; import-checkpoint reads one checkpoint file (.ckpt)")
    with open(src, "rb") as f:
        head = f.read(4)
    if not head:
        raise StageError(f"{src}: empty file (0 bytes); not a checkpoint")
    if head != _ZIP_MAGIC and not (head[0] == 0x80 and 2 <= head[1] <= 5):
        raise StageError(
            f"{src}: not a torch checkpoint (neither a zip archive nor a pickle; starts with "
            f"{head.hex(' ')})"
        )


def _print_report(title: str, items) -> None:
    items = list(items)
    if items:
        print(f"{title}:", file=sys.stderr)
        for item in items:
            print(f"  {item}", file=sys.stderr)


@cli_errors
def import_main(
    src: Path = typer.Argument(..., help="s3prl or original Mockingjay checkpoint file (.ckpt)"),
    dest: Path = typer.Argument(
        ..., help="model directory to write (model.safetensors + config.json)"
    ),
    force: bool = typer.Option(False, "--force", help="replace DEST if it exists"),
) -> None:
    """Convert an s3prl / original Mockingjay checkpoint into our model directory (read safely)."""
    check_checkpoint_file(src)
    from mockingjay.checkpoint import save_model_dir
    from mockingjay.interop import import_checkpoint

    if dest.exists() and not force and (not dest.is_dir() or any(dest.iterdir())):
        raise StageError(f"{dest} exists; pass --force to replace it")
    check_inputs_apart(dest, [src], "DEST")  # even with --force: replacing DEST would delete SRC
    check_writable(dest, "DEST")
    imported = import_checkpoint(src)
    model, config = imported.model, imported.model.config
    print(
        f"import-checkpoint: {imported.layout} layout, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads} heads, FFN {config.intermediate_size}, R={config.downsample_rate}, "
        f"input {config.input_dim}-d, target {config.target_dim}-d, {config.activation}",
        file=sys.stderr,
    )
    _print_report(
        "fields not mapped (kept in config.json 'import.unmapped')",
        (f"{k} = {v!r}" for k, v in imported.unmapped.items()),
    )
    _print_report("entries not used (training state)", imported.ignored)
    _print_report("notes", imported.notes)
    features = imported.sections.get("features")
    if features:
        settings = " ".join(f"{k}={features[k]}" for k in FEATURE_KEYS)
        print(f"features (featurize params the model expects): {settings}", file=sys.stderr)
    _print_report(
        "features: known differences from the source's own extraction", imported.feature_differences
    )
    run_params = {
        "src": str(src),
        "dest": str(dest),
        "layout": imported.layout,
        **{f"model.{k}": v for k, v in config.to_dict().items()},
    }
    with tracking.stage_run("import-checkpoint", run_params) as mlflow:
        save_model_dir(dest, model, config, extra=imported.sections)
        mlflow.log_metrics(
            {
                "num_parameters": float(model.num_parameters(include_head=False)),
                "unmapped_fields": float(len(imported.unmapped)),
            }
        )
        mlflow.log_artifact(str(dest / "config.json"))
    print(f"import-checkpoint: {src} -> {dest}", file=sys.stderr)


@cli_errors
def export_main(
    src: Path = typer.Argument(..., help="our model directory (model.safetensors + config.json)"),
    dest: Path = typer.Argument(..., help="checkpoint file to write (.ckpt)"),
    layout: str = typer.Option(
        "s3prl", "--layout", help="s3prl (s3prl/upstream/mockingjay) | mockingjay (original code)"
    ),
    force: bool = typer.Option(False, "--force", help="replace DEST if it exists"),
) -> None:
    """Write our model as an s3prl (or original Mockingjay) checkpoint that their loaders read."""
    # Checked before torch loads and the model is converted: as import-checkpoint does.
    if dest.is_dir():
        raise StageError(
            f"{dest} is a folder; export writes one checkpoint file: name it, e.g. {dest / 'model.ckpt'}"
        )
    if dest.exists() and not force:
        raise StageError(f"{dest} exists; pass --force to replace it")
    check_inputs_apart(dest, [src], "DEST")
    check_writable(dest, "DEST")
    from mockingjay.atomic import write_file_atomically
    from mockingjay.checkpoint import (
        is_finetuned_dir,
        load_config,
        load_encoder_dir,
        load_model_dir,
    )
    from mockingjay.interop import LAYOUTS, export_checkpoint
    from mockingjay.tensor_files import save_torch

    if layout not in LAYOUTS:
        raise StageError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    # a fine-tuned model exports its encoder (its head classifies; s3prl's loader reads the encoder)
    model, _ = load_encoder_dir(src) if is_finetuned_dir(src) else load_model_dir(src)
    checkpoint, notes = export_checkpoint(model, load_config(src), layout)
    _print_report("notes", notes)
    with tracking.stage_run(
        "export-checkpoint", {"src": str(src), "dest": str(dest), "layout": layout}
    ) as mlflow:
        # a failed or interrupted write leaves no half file behind
        write_file_atomically(
            dest, lambda tmp: save_torch(checkpoint, tmp), dest.with_name(f".{dest.name}.partial")
        )
        mlflow.log_metric("bytes_written", float(dest.stat().st_size))
    print(f"export-checkpoint: {src} -> {dest} ({layout} layout)", file=sys.stderr)
