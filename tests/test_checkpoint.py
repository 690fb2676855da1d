import json
import random

import numpy as np
import pytest
import torch

from mockingjay.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    load_config,
    load_model_dir,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    save_model_dir,
    write_directory_atomically,
)
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.tensor_files import capture_rng_state, restore_rng_state

CONFIG = ModelConfig(
    input_dim=6, target_dim=6, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
)


def tiny_model(seed: int = 0) -> MockingjayForMAM:
    torch.manual_seed(seed)
    return MockingjayForMAM(CONFIG)


def save(directory, step, model=None, keep_last=3):
    model = model or tiny_model(step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 5, 6), torch.tensor([5, 3])).sum().backward()
    optimizer.step()
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
    return save_checkpoint(
        directory,
        step,
        model,
        {"model": CONFIG.to_dict(), "mask": {}, "training": {}},
        state,
        keep_last=keep_last,
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoint_round_trip_with_weights_only_state(tmp_path):
    model = tiny_model(1)
    path = save(tmp_path, 100, model)
    assert path.name == "step-000100"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "trainer_state.pt",
    ]
    assert latest_checkpoint(tmp_path) == path
    restored = tiny_model(2)
    assert not same_weights(model, restored)
    load_weights(path, restored)
    assert same_weights(model, restored)
    state = load_trainer_state(path)  # torch.load(weights_only=True) inside
    assert state["step"] == 100 and "state" in state["optimizer"]
    assert load_config(path)["model"]["hidden_size"] == 16


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [40, 50]


def test_leftover_temporary_directory_is_ignored_and_cleaned(tmp_path):
    good = save(tmp_path, 10)
    # A crash in the middle of writing step 20 leaves a hidden temporary directory behind.
    partial = tmp_path / ".step-000020.tmp-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10]
    assert latest_checkpoint(tmp_path) == good
    save(tmp_path, 30)
    assert not partial.exists()


def test_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_directory_atomically(tmp_path / "step-000010", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage", ["truncate_weights", "missing_state", "bad_config", "truncate_state"]
)
def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, damage):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    if damage == "truncate_weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing_state":
        (newest / "trainer_state.pt").unlink()
    elif damage == "bad_config":
        (newest / "config.json").write_text("{not json")
    else:
        data = (newest / "trainer_state.pt").read_bytes()
        (newest / "trainer_state.pt").write_bytes(data[:100])
    with pytest.warns(CheckpointWarning, match="step-000020"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-000010"


def test_no_checkpoint_at_all(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None


def test_saving_again_replaces_a_corrupt_checkpoint_of_the_same_step(tmp_path):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    (newest / "model.safetensors").write_bytes(b"garbage")
    save(tmp_path, 20, keep_last=1)
    assert latest_checkpoint(tmp_path) == newest
    assert [step for step, _ in list_checkpoints(tmp_path)] == [20]


def test_model_dir_round_trip(tmp_path):
    model = tiny_model(3).eval()
    save_model_dir(tmp_path / "model", model, CONFIG, extra={"mask": {"span_length": 7}})
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model"] == CONFIG.to_dict() and config["mask"] == {"span_length": 7}
    loaded, loaded_config = load_model_dir(tmp_path / "model")
    assert loaded_config == CONFIG and not loaded.training
    features, lengths = torch.randn(2, 9, 6), torch.tensor([9, 4])
    with torch.no_grad():
        assert torch.equal(loaded(features, lengths), model(features, lengths))
    # Overwriting an existing model directory works (atomic replace).
    save_model_dir(tmp_path / "model", tiny_model(4), CONFIG)
    assert not same_weights(load_model_dir(tmp_path / "model")[0], model)


def test_load_model_dir_rejects_foreign_or_mismatched_files(tmp_path):
    save_model_dir(tmp_path / "model", tiny_model(), CONFIG)
    config_file = tmp_path / "model" / "config.json"
    payload = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**payload, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="config.json"):
        load_model_dir(tmp_path / "model")
    config_file.write_text(
        json.dumps({**payload, "model": {**payload["model"], "hidden_size": 32}})
    )
    with pytest.raises(CheckpointError, match="do not match"):
        load_model_dir(tmp_path / "model")
    with pytest.raises(CheckpointError):
        load_model_dir(tmp_path / "nowhere")
