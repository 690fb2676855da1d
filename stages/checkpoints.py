"""checkpoints list / remove: the resume state pretrain keeps, one folder per configuration.

`mockingjay pretrain` never deletes another configuration's resume state (mockingjay/resume_state.py);
these commands show what is kept and delete one state on request. Not DVC stages; no MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mockingjay import resume_state

from .common import StageError, cli_errors

CHECKPOINTS_OPTION = typer.Option(
    Path("models/checkpoints"), "--checkpoints", help="pretrain's checkpoints folder"
)

app = typer.Typer(
    help="List or remove the resume state pretrain keeps per configuration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("list")
@cli_errors
def list_main(checkpoints: Path = CHECKPOINTS_OPTION) -> None:
    """One line per configuration: its folder, the step it reached, of how many."""
    states = resume_state.list_states(checkpoints)
    if not states:
        print(f"{checkpoints}: no resume state", file=sys.stderr)
    for state in states:
        print(resume_state.describe(state))


@app.command("remove")
@cli_errors
def remove_main(
    names: list[str] = typer.Argument(
        ..., help="config-<fingerprint> folder name(s), or the fingerprint(s)"
    ),
    checkpoints: Path = CHECKPOINTS_OPTION,
) -> None:
    """Delete the resume state of the named configuration(s); refused while a pretrain run holds the folder."""
    if not checkpoints.is_dir():
        raise StageError(f"{checkpoints}: no such checkpoints folder")
    with resume_state.locked(checkpoints):
        for name in names:
            print(
                f"checkpoints: removed {resume_state.remove_state(checkpoints, name)}",
                file=sys.stderr,
            )
