"""pretrain.snapshots: checkpoint steps kept as models in the stage's output (the curve reads them)."""

from __future__ import annotations

import pytest
import torch

from mockingjay.checkpoint import load_model_dir, save_checkpoint
from mockingjay.config import ParamError
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.trainer import TrainConfig
from stages.pretrain import write_snapshots
from stages.pretrain_params import _check_snapshots


def test_snapshot_steps_must_be_kept_checkpoint_steps():
    train = TrainConfig(total_steps=1000, checkpoint_every=200, keep_checkpoints=3)
    _check_snapshots([600, 1000], train)
    with pytest.raises(
        ParamError,
        match=r"pretrain.snapshots: 300 is not a checkpoint step .*checkpoint_every = 200",
    ):
        _check_snapshots([300], train)
    with pytest.raises(ParamError, match="not a checkpoint step"):
        _check_snapshots([1200], train)
    with pytest.raises(
        ParamError, match=r"keep_checkpoints: 3 would delete the step-200 checkpoint .* needs >= 5"
    ):
        _check_snapshots([200], train)


def test_snapshots_copy_the_checkpoint_models(tmp_path):
    config = ModelConfig(
        input_dim=4, target_dim=4, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16
    )
    models = {}
    for step in (2, 4):
        torch.manual_seed(step)
        models[step] = MockingjayForMAM(config)
        save_checkpoint(
            tmp_path / "ckpt",
            step,
            models[step],
            {"model": config.to_dict()},
            {"step": step},
            keep_last=5,
        )
    written = write_snapshots(tmp_path / "ckpt", [2], tmp_path / "out")
    assert [p.name for p in written] == ["step-000002"] and not (
        written[0] / "trainer_state.pt"
    ).exists()
    loaded, _ = load_model_dir(written[0])
    for name, tensor in models[2].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    from stages.common import StageError

    with pytest.raises(StageError, match="no checkpoint of step 6"):
        write_snapshots(tmp_path / "ckpt", [6], tmp_path / "out")
