"""The `mockingjay` command: one subcommand per pipeline stage."""

from __future__ import annotations

import os
import sys

import typer

# Under DVC or in CI, stderr is a pipe: a progress bar redrawn ten times a second floods the log.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "10")

from . import (  # noqa: E402
    align,
    checkpoints,
    extract,
    featurize,
    finetune,
    interop,
    prepare,
    pretrain,
    probe,
    report,
    report_tables,
    tracking,
)
from .common import cli_errors  # noqa: E402

app = typer.Typer(
    help="Mockingjay: masked acoustic model pretraining and probing, as a DVC + MLflow pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("prepare")(prepare.main)
app.command("align")(align.main)
app.command("featurize")(featurize.main)
app.command("pretrain")(pretrain.main)
app.command("extract")(extract.main)
app.command("probe")(probe.main)
app.command("finetune")(finetune.main)
app.command("import-checkpoint")(interop.import_main)
app.command("export-checkpoint")(interop.export_main)
app.command("headline")(report.headline_main)
app.command("release")(report.release_main)
app.command("results-table")(report_tables.table_main)
app.add_typer(checkpoints.app, name="checkpoints")
app.command("relocate-artifacts")(cli_errors(tracking.relocate_artifacts_main))

if __name__ == "__main__":
    app()
