import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import mockingjay.trainer as trainer_module
from mockingjay.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_config,
    load_model_dir,
    load_trainer_state,
)
from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.masking import MaskConfig
from mockingjay.model import ModelConfig
from mockingjay.trainer import NonFiniteLossError, TrainConfig, TrainData, Trainer, train

DIM = 6
MODEL = ModelConfig(
    input_dim=DIM, target_dim=DIM, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
)
MASK = MaskConfig(span_length=3)


def write_corpus(path: Path, count: int, seed: int, poison: bool = False) -> None:
    """A fixed 'spectral envelope', a per-utterance shift and a slow wave: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    with RaggedWriter(path, dim=DIM) as writer:
        for i in range(count):
            length = int(rng.integers(15, 45))
            t = np.arange(length)[:, None]
            envelope = np.linspace(-2.0, 2.0, DIM)[None] + 0.3 * rng.standard_normal(DIM)[None]
            writer.append(f"utt{i:03d}", envelope + 0.3 * np.sin(0.2 * t + rng.uniform(0, 6)))
    if poison:  # written into the finished store: the writer itself refuses inf
        store = RaggedArray(path, mode="r+")
        for i in range(count):
            store[i][len(store[i]) // 2, 0] = np.inf
        store.data.flush()


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features")
    write_corpus(root / "train", 48, seed=0)
    write_corpus(root / "dev", 12, seed=1)
    return root


def config(**overrides) -> TrainConfig:
    base = TrainConfig(
        total_steps=6,
        learning_rate=2e-3,
        warmup_proportion=0.1,
        max_frames_per_batch=240,
        max_length=40,
        log_every=1,
        checkpoint_every=3,
        keep_checkpoints=2,
        progress=False,
    )
    return dataclasses.replace(base, **overrides)


def run(
    settings: TrainConfig, train_store: Path, heldout_store: Path | None, out: Path, **options
) -> dict:
    """Train MODEL with MASK; checkpoints in out/checkpoints, the model in out/model."""
    return train(
        MODEL,
        MASK,
        settings,
        TrainData(train_store, heldout_store),
        out / "checkpoints",
        out / "model",
        **options,
    )


def weights_digest(model_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model_dir(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


class Recorder:
    def __init__(self, stop_at_step: int | None = None):
        self.records: list[dict] = []
        self.stop_at_step = stop_at_step

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if record["event"] == "train" and record["step"] == self.stop_at_step:
            raise KeyboardInterrupt(f"simulated crash at step {record['step']}")

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["event"] == kind]


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", -1e-3),
        ("learning_rate", float("nan")),
        ("grad_accumulation", 0),
        ("total_steps", 0),
        ("precision", "fp16"),
        ("warmup_proportion", 1.5),
        ("max_length", 0),
        ("device", "tpu"),
    ],
)
def test_invalid_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value}).validate()


def test_loss_decreases_and_heldout_improves(corpus, tmp_path):
    recorder = Recorder()
    result = run(
        config(total_steps=30, learning_rate=5e-3, log_every=5, checkpoint_every=15),
        corpus / "train",
        corpus / "dev",
        tmp_path / "run",
        callback=recorder,
    )
    losses = [r["loss"] for r in recorder.events("train")]
    assert [r["step"] for r in recorder.events("train")] == list(range(5, 31, 5))
    assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0]
    assert result["heldout_loss_final"] < 0.6 * result["heldout_loss_initial"]
    assert [r["step"] for r in recorder.events("eval")] == [0, 30]
    assert [r["step"] for r in recorder.events("checkpoint")] == [15, 30]
    first = recorder.events("train")[0]
    for key in ("learning_rate", "grad_norm", "audio_seconds_per_second", "skipped_batches"):
        assert np.isfinite(first[key])
    assert recorder.events("train")[-1]["learning_rate"] == 0.0  # schedule decays to zero
    assert result["steps"] == 30 and result["skipped_batches"] == 0 and result["epoch"] >= 2
    # The final model directory holds the trained weights (same as the last checkpoint).
    final = weights_digest(tmp_path / "run" / "model")
    last = weights_digest(tmp_path / "run" / "checkpoints" / "step-000030")
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_interrupted_and_resumed_run_matches_uninterrupted(corpus, tmp_path):
    settings = config(total_steps=7, grad_accumulation=2)  # 14 batches: crosses epoch boundaries
    straight = run(settings, corpus / "train", corpus / "dev", tmp_path / "straight")

    crashed = Recorder(stop_at_step=5)
    with pytest.raises(KeyboardInterrupt):
        run(settings, corpus / "train", corpus / "dev", tmp_path / "resumed", callback=crashed)
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [3]
    assert not (tmp_path / "resumed" / "model").exists()

    rerun = Recorder()
    resumed = run(settings, corpus / "train", corpus / "dev", tmp_path / "resumed", callback=rerun)
    assert resumed["resumed_from"].endswith("step-000003")
    assert rerun.records[0]["event"] == "resume"
    assert [r["step"] for r in rerun.events("train")] == [4, 5, 6, 7]
    assert resumed["heldout_loss_initial"] == straight["heldout_loss_initial"]
    assert resumed["heldout_loss_final"] == straight["heldout_loss_final"]
    a, b = (
        weights_digest(tmp_path / "straight" / "model"),
        weights_digest(tmp_path / "resumed" / "model"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "resumed weights differ from the uninterrupted run"
    )
    # Same learning rate and data position in the final trainer state.
    state_a = load_trainer_state(tmp_path / "straight" / "checkpoints" / "step-000007")
    state_b = load_trainer_state(tmp_path / "resumed" / "checkpoints" / "step-000007")
    assert (state_a["epoch"], state_a["batch_in_epoch"]) == (
        state_b["epoch"],
        state_b["batch_in_epoch"],
    )
    assert state_a["scheduler"]["_last_lr"] == state_b["scheduler"]["_last_lr"]


def test_completed_run_is_not_trained_again(corpus, tmp_path):
    settings = config(total_steps=3)
    args = (
        MODEL,
        MASK,
        settings,
        TrainData(corpus / "train"),
        tmp_path / "ckpt",
        tmp_path / "final",
    )
    train(*args, extra_config={"features": {"hop_ms": 10}})
    assert [step for step, _ in list_checkpoints(tmp_path / "ckpt")] == [3]
    assert load_config(tmp_path / "final")["features"] == {"hop_ms": 10}
    assert load_config(tmp_path / "ckpt" / "step-000003")["training"]["total_steps"] == 3
    again = train(*args, extra_config={"features": {"hop_ms": 10}})
    assert (
        again["steps_this_run"] == 0 and again["steps"] == 3 and again["heldout_loss_final"] is None
    )


def digest_files(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    features = tmp_path / "features"
    write_corpus(features / "train", 24, seed=0)
    settings = config(total_steps=8, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(settings, features / "train", None, tmp_path / "run", callback=Recorder(stop_at_step=5))
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert good.name == "step-000004"
    before = digest_files(good)

    write_corpus(features / "train", 24, seed=0, poison=True)  # same utterances, now with inf
    with pytest.raises(NonFiniteLossError, match="step-000004"):
        run(settings, features / "train", None, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == good
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 4]
    assert digest_files(good) == before
    assert not (tmp_path / "run" / "model").exists()


def test_nonfinite_loss_with_no_checkpoint_yet(tmp_path):
    write_corpus(tmp_path / "train", 16, seed=2, poison=True)
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        run(config(total_steps=4), tmp_path / "train", None, tmp_path / "run")
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_batches_with_nothing_masked_are_counted_not_nan(corpus, tmp_path, monkeypatch):
    real_mask_batch = trainer_module.mask_batch

    def mask_nothing(features, lengths, config, downsample_rate=1, generator=None):
        masked = real_mask_batch(features, lengths, config, downsample_rate, generator)
        return masked._replace(
            inputs=features,
            time_mask=torch.zeros_like(masked.time_mask),
            num_masked_frames=torch.zeros_like(masked.num_masked_frames),
        )

    monkeypatch.setattr(trainer_module, "mask_batch", mask_nothing)
    recorder = Recorder()
    result = run(
        config(total_steps=3, grad_accumulation=2),
        corpus / "train",
        None,
        tmp_path / "run",
        callback=recorder,
    )
    assert result["skipped_batches"] == 6
    assert [r["loss"] for r in recorder.events("train")] == [0.0, 0.0, 0.0]


def test_feature_dims_must_match_the_model(corpus, tmp_path):
    wrong = dataclasses.replace(MODEL, input_dim=DIM + 1)
    with pytest.raises(ValueError, match="input_dim"):
        Trainer(
            wrong,
            MASK,
            config(),
            TrainData(corpus / "train"),
            tmp_path / "run" / "checkpoints",
            tmp_path / "run" / "model",
        )
