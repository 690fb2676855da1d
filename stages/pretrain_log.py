"""The training log of a pretrain run: the trainer's records, kept beside the checkpoints and
mirrored to MLflow (`TrainingLog`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mockingjay import resume_state

from .common import write_text_atomically


class TrainingLog:
    """Collects the trainer's records, mirrors them to MLflow on rank 0, and keeps the training log
    of the whole run in `log_path` (beside the checkpoints), so that a resumed run, even one resumed
    at its last step, still reports the loss curve and final loss of the steps before the resume."""

    def __init__(self, mlflow, log_path: Path | None):
        self.mlflow = mlflow
        self.log_path = log_path
        self.train: list[dict] = []
        self._mode = "w"  # a fresh run starts a new log; a resumed one appends to what it kept

    def __call__(self, record: dict) -> None:
        if record.get("event") == "train":
            self.train.append(record)
            if self.log_path is not None:
                self.log_path.parent.mkdir(
                    parents=True, exist_ok=True
                )  # before the first checkpoint makes it
                with open(self.log_path, self._mode) as f:
                    f.write(json.dumps(record) + "\n")
                self._mode = "a"
            if self.mlflow is not None:
                keys = (
                    "loss",
                    "learning_rate",
                    "grad_norm",
                    "audio_seconds_per_second",
                    "skipped_batches",
                )
                self.mlflow.log_metrics(
                    {k: float(record[k]) for k in keys}, step=int(record["step"])
                )
        elif record.get("event") == "resume":
            print(
                f"pretrain: resumed at step {record['step']} from {record['path']}", file=sys.stderr
            )
            if (
                self.log_path is not None
            ):  # steps after the checkpoint are trained again: drop their records
                self.train = [
                    r
                    for r in resume_state.read_train_log(self.log_path)
                    if r["step"] <= record["step"]
                ]
                write_text_atomically(
                    self.log_path, "".join(json.dumps(r) + "\n" for r in self.train)
                )
                self._mode = "a"
            if self.mlflow is not None:
                self.mlflow.set_tag("resumed_from", record["path"])
