"""Resume state per configuration (mockingjay/resume_state.py): the fingerprint a stage computes
matches the one read back from a checkpoint, the older layout is adopted, and the lock refuses."""

from __future__ import annotations

import dataclasses
import os

import pytest

from mockingjay import resume_state
from mockingjay.checkpoint import load_config, save_checkpoint
from mockingjay.masking import MaskConfig
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.resume_state import ResumeStateError, fingerprint, resume_record, run_record
from mockingjay.trainer import TrainConfig

MODEL = ModelConfig(
    input_dim=8, target_dim=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
)
PROVENANCE = {"features": {"n_mels": 8, "hop_ms": 10.0}, "data": {"fingerprint": "abc"}}


def write_legacy(folder, train: TrainConfig, step: int) -> None:
    """A checkpoint as an older trainer wrote it (full training section, with the frame_rate it then
    carried), at the top of the folder."""
    config = {
        **PROVENANCE,
        "model": MODEL.to_dict(),
        "mask": MaskConfig().to_dict(),
        "training": {**dataclasses.replace(train, device="cpu").to_dict(), "frame_rate": 80.0},
    }
    save_checkpoint(folder, step, MockingjayForMAM(MODEL), config, {"step": step})


def stage_record(train: TrainConfig) -> dict:
    """The record `mockingjay pretrain` builds before it trains."""
    return run_record(MODEL.to_dict(), MaskConfig().to_dict(), train.to_dict(), PROVENANCE)


def test_a_checkpoint_read_back_has_the_fingerprint_the_stage_computes_and_the_old_layout_is_adopted(
    tmp_path,
):
    train = TrainConfig(total_steps=5, adam_betas=(0.9, 0.98), device="auto")
    write_legacy(tmp_path, train, 3)
    (tmp_path / "train_log.jsonl").write_text('{"step": 2}\n')
    stored = load_config(tmp_path / "step-000003")  # through JSON: the betas tuple is a list now
    assert fingerprint(resume_record(stored)) == fingerprint(stage_record(train))
    assert fingerprint(stage_record(dataclasses.replace(train, total_steps=6))) != fingerprint(
        stage_record(train)
    )

    assert resume_state.is_checkpoints_folder(tmp_path)
    moved = resume_state.adopt_legacy(tmp_path, stored)
    assert moved == resume_state.state_dir(tmp_path, stage_record(train))
    assert sorted(p.name for p in tmp_path.iterdir()) == [moved.name]
    assert sorted(p.name for p in moved.iterdir()) == ["step-000003", "train_log.jsonl"]
    (listed,) = resume_state.list_states(
        tmp_path, stage_record(dataclasses.replace(train, total_steps=6))
    )
    assert (listed["step"], listed["total_steps"], listed["differs"]) == (
        3,
        5,
        ["training.total_steps=5"],
    )

    (tmp_path / "notes.txt").write_text("mine\n")
    assert not resume_state.is_checkpoints_folder(tmp_path)  # a user's file: not resume state


def test_the_lock_refuses_a_second_holder_naming_the_first_and_is_released(tmp_path):
    with resume_state.locked(tmp_path):
        with pytest.raises(ResumeStateError, match=rf"in use by another run \(PID {os.getpid()}\)"):
            with resume_state.locked(tmp_path):
                pass
    with resume_state.locked(tmp_path):  # released when its holder let go
        pass
    with pytest.raises(ResumeStateError, match="no such resume state"):
        resume_state.remove_state(tmp_path, "config-0123456789ab")


def test_a_run_resumes_only_its_own_configuration_and_is_told_of_the_others(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    train = TrainConfig(total_steps=5, device="cpu")
    write_legacy(checkpoints, train, 3)
    moved = resume_state.adopt_older_layout(checkpoints)
    assert moved == resume_state.state_dir(checkpoints, stage_record(train))
    assert resume_state.adopt_older_layout(checkpoints) is None  # nothing left at the top

    same = resume_state.resume_decision(
        checkpoints, stage_record(dataclasses.replace(train, log_every=7))
    )
    assert (same.state, same.latest, same.others, same.aside) == (
        moved,
        moved / "step-000003",
        [],
        None,
    )
    (tmp_path / "checkpoints.previous").mkdir()
    other = resume_state.resume_decision(
        checkpoints, stage_record(dataclasses.replace(train, total_steps=6))
    )
    assert (
        other.latest is None
        and other.state != moved
        and other.aside == tmp_path / "checkpoints.previous"
    )
    assert [s["path"] for s in other.others] == [moved]
