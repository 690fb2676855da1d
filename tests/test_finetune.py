"""Fine-tuning (mockingjay/finetune.py) on synthetic stores: what moves and what stays frozen,
checked on the parameters' bytes; a planted signal that a frozen random encoder hides and
fine-tuning finds; resuming bit for bit; nested, deterministic label fractions; the model
directory read back as an encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mockingjay.checkpoint import is_finetuned_dir, load_encoder_dir
from mockingjay.featstore import RaggedWriter
from mockingjay.finetune import FineTuner, predict
from mockingjay.finetune_config import (
    AugmentConfig,
    FinetuneConfig,
    FinetuneConfigError,
    HeadConfig,
)
from mockingjay.finetune_data import LabelledDataset, task_data
from mockingjay.model import ModelConfig
from mockingjay.probe_plan import Utterance, select_utterances
from mockingjay.scores import accuracy
from mockingjay.store_layout import labels_store
from mockingjay.train_config import TrainConfig

DIM = 24


def planted_store(path, utterances: int, seed: int, frames: int = 60):
    """Frames whose label (0/1) is the sign of dimension 0 (+-1, noiseless), every other
    dimension noise of std 3: one weak direction among strong ones."""
    rng = np.random.default_rng(seed)
    labels = []
    with RaggedWriter(path, DIM) as writer:
        for u in range(utterances):
            label = rng.integers(0, 2, frames)
            rows = rng.normal(0, 3, (frames, DIM))
            rows[:, 0] = 2.0 * label - 1.0
            writer.append(f"u{seed}_{u:03d}", rows.astype(np.float16))
            labels.append(label.astype(np.int64))
    return LabelledDataset(path, np.arange(utterances), frame_labels=labels)


# A bottleneck of 4 random projections of 24 dims: a frozen random encoder keeps ~1/6 of the
# planted direction among the noise, so a linear head on it is near chance; fine-tuning can turn
# its input projection towards the planted dimension.
BOTTLENECK = ModelConfig(
    input_dim=DIM, target_dim=DIM, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=8
)


def train_config(**changes) -> TrainConfig:
    values = dict(
        total_steps=60,
        learning_rate=1e-2,
        warmup_proportion=0.0,
        max_frames_per_batch=600,
        max_length=None,
        log_every=10,
        checkpoint_every=1000,
        keep_checkpoints=1,
        seed=0,
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**values, **changes})


def tuner(tmp, data, variant, model_config=BOTTLENECK, train=None, pretrained=None, **config):
    return FineTuner(
        model_config,
        FinetuneConfig(
            task="phone", variant=variant, num_classes=2, encoder_learning_rate=1e-2, **config
        ),
        train or train_config(),
        data["train"],
        data["dev"],
        tmp / f"{variant}-checkpoints",
        tmp / f"{variant}-model",
        pretrained_dir=pretrained,
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {
        "train": planted_store(root / "train", 40, seed=1),
        "dev": planted_store(root / "dev", 8, seed=2),
        "test": planted_store(root / "test", 20, seed=3),
    }


@pytest.fixture(scope="module")
def random_encoder_dir(tmp_path_factory):
    """A model directory holding a randomly initialised encoder: the `pretrained` model the
    frozen variant keeps as it is."""
    from mockingjay.checkpoint import save_model_dir
    from mockingjay.model import MockingjayForMAM

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("random") / "model"
    save_model_dir(path, MockingjayForMAM(BOTTLENECK), BOTTLENECK)
    return path


def parameter_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    return {n: p.detach().cpu().numpy().tobytes() for n, p in module.state_dict().items()}


def changed(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_a_planted_signal_a_frozen_random_encoder_hides_is_recovered_by_fine_tuning(
    planted, random_encoder_dir, tmp_path
):
    scores = {}
    for variant in ("frozen", "finetuned"):
        run = tuner(tmp_path, planted, variant, pretrained=random_encoder_dir)
        run.fit()
        truth, predicted = predict(run.model, planted["test"], run.config, run.device)
        scores[variant] = accuracy(truth, predicted)
    assert scores["frozen"] < 0.75, scores  # the random bottleneck hides the planted dimension
    assert scores["finetuned"] > 0.95, scores  # training the encoder finds it


def test_gradients_reach_the_encoder_only_when_it_is_not_frozen(
    planted, random_encoder_dir, tmp_path
):
    short = train_config(total_steps=3)
    start = parameter_bytes(load_encoder_dir(random_encoder_dir)[0])
    frozen = tuner(tmp_path, planted, "frozen", train=short, pretrained=random_encoder_dir)
    frozen.fit()
    assert changed(start, parameter_bytes(frozen.model.encoder)) == set()
    assert frozen.model.head.classifier.weight.grad is None  # zeroed after the last step
    assert not any(p.requires_grad for p in frozen.model.encoder.parameters())

    tuned = tuner(tmp_path, planted, "finetuned", train=short, pretrained=random_encoder_dir)
    tuned.fit()
    assert changed(start, parameter_bytes(tuned.model.encoder)) == set(start)  # every tensor

    # Frozen for the first 2 of 3 steps: the encoder moves in the third only.
    for steps, moved in ((2, False), (3, True)):
        delayed = tuner(
            tmp_path / f"delayed{steps}",
            planted,
            "finetuned",
            train=train_config(total_steps=steps),
            pretrained=random_encoder_dir,
            freeze_encoder_steps=2,
        )
        delayed.fit()
        assert bool(changed(start, parameter_bytes(delayed.model.encoder))) == moved, steps

    kept = tuner(
        tmp_path / "input",
        planted,
        "finetuned",
        train=short,
        pretrained=random_encoder_dir,
        freeze_input_representation=True,
    )
    kept.fit()
    moved = changed(start, parameter_bytes(kept.model.encoder))
    assert moved and not any(name.startswith("input_representation.") for name in moved)
    assert any(name.startswith("layers.") for name in moved)


def test_scratch_and_logmel_start_from_no_pretrained_weights(planted, tmp_path):
    scratch = tuner(tmp_path, planted, "scratch", train=train_config(total_steps=2))
    scratch.fit()
    logmel = tuner(tmp_path, planted, "logmel", train=train_config(total_steps=2))
    logmel.fit()
    assert logmel.model.encoder is None
    assert tuple(logmel.model.head.classifier.weight.shape) == (2, DIM)  # on the input features
    with pytest.raises(ValueError, match="needs the pretrained model directory"):
        tuner(tmp_path, planted, "finetuned")


def test_an_interrupted_fine_tuning_resumes_to_the_same_weights(
    planted, random_encoder_dir, tmp_path
):
    augment = AugmentConfig(time_mask_proportion=0.2, span_length=3, freq_mask_proportion=0.2)
    options = dict(pretrained=random_encoder_dir, augment=augment, freeze_encoder_steps=2)
    whole = tuner(
        tmp_path / "whole", planted, "finetuned", train=train_config(total_steps=8), **options
    )
    whole.fit()
    stops = iter([False, False, False, True])  # asked after each step: stop after the 4th
    first = tuner(
        tmp_path / "parts",
        planted,
        "finetuned",
        train=train_config(total_steps=8, checkpoint_every=1000),
        **options,
    )
    first.should_stop = lambda: next(stops, False)
    from mockingjay.training_loop import TrainingStopped

    with pytest.raises(TrainingStopped) as stopped:
        first.fit()
    assert stopped.value.step == 4
    second = tuner(
        tmp_path / "parts",
        planted,
        "finetuned",
        train=train_config(total_steps=8, checkpoint_every=1000),
        **options,
    )
    result = second.fit()
    assert result["resumed_from"] is not None and result["steps_this_run"] == 4
    assert parameter_bytes(second.model) == parameter_bytes(whole.model)


def test_the_model_directory_holds_encoder_and_head_and_reads_back_as_an_encoder(
    planted, random_encoder_dir, tmp_path
):
    run = tuner(
        tmp_path,
        planted,
        "finetuned",
        train=train_config(total_steps=2),
        pretrained=random_encoder_dir,
        head=HeadConfig(layer="weighted_sum", kind="mlp", hidden_size=8, dropout=0.1),
    )
    run.fit()
    model_dir = tmp_path / "finetuned-model"
    assert is_finetuned_dir(model_dir) and not is_finetuned_dir(random_encoder_dir)
    encoder, config = load_encoder_dir(model_dir)
    assert config == BOTTLENECK
    assert parameter_bytes(encoder) == parameter_bytes(run.model.encoder)
    weights = run.model.head.softmax_layer_weights()
    assert len(weights) == BOTTLENECK.num_layers + 1 and abs(sum(weights) - 1) < 1e-6


@pytest.mark.parametrize("pooling", ["mean", "attentive"])
def test_utterance_heads_pool_only_valid_frames(pooling):
    from mockingjay.classifier import MockingjayForClassification

    torch.manual_seed(0)
    config = FinetuneConfig(
        task="speaker", variant="scratch", num_classes=3, head=HeadConfig(pooling=pooling)
    )
    model = MockingjayForClassification(BOTTLENECK, config).eval()
    features = torch.randn(2, 30, DIM)
    lengths = torch.tensor([30, 17])
    padded = features.clone()
    padded[1, 17:] = 1e3  # what lies past an utterance's length must not change its logits
    alone = model(features[1:, :17], torch.tensor([17]))
    together = model(padded, lengths)
    assert together.shape == (2, 3)
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)


def test_finetune_settings_name_the_bad_field():
    with pytest.raises(FinetuneConfigError, match="^kind: must be one of linear, mlp"):
        HeadConfig(kind="transformer")
    with pytest.raises(FinetuneConfigError, match="^variant: "):
        FinetuneConfig(variant="pretrained")
    with pytest.raises(FinetuneConfigError, match="^head.layer: weighted_sum needs an encoder"):
        FinetuneConfig(variant="logmel", head=HeadConfig(layer="weighted_sum"))
    with pytest.raises(FinetuneConfigError, match="^time_mask_proportion: "):
        AugmentConfig(time_mask_proportion=1.5)
    frozen = FinetuneConfig(variant="frozen")
    delayed = FinetuneConfig(freeze_encoder_steps=3)
    assert all(frozen.encoder_frozen_at(s) for s in range(10))
    assert [delayed.encoder_frozen_at(s) for s in range(5)] == [True] * 3 + [False] * 2


def write_features(root, speakers: int = 6, per_speaker: int = 10):
    """A features folder as featurize writes it: stores per split, frame labels (a third of the
    utterances unlabelled, as a corpus without transcripts), and utterances.tsv."""
    rng = np.random.default_rng(0)
    rows = []
    for split in ("train", "dev", "test"):
        with (
            RaggedWriter(root / split, DIM) as features,
            RaggedWriter(labels_store(root, split), 1, dtype="int16") as labels,
        ):
            for s in range(speakers):
                for u in range(per_speaker if split == "train" else 2):
                    utt = f"{split}_s{s}_{u:02d}"
                    frames = int(rng.integers(20, 40))
                    features.append(utt, rng.normal(size=(frames, DIM)).astype(np.float16))
                    labelled = u % 3 != 0
                    values = rng.integers(0, 40, frames) if labelled else np.full(frames, -1)
                    labels.append(utt, values.astype(np.int16))
                    rows.append((utt, Utterance(split, "c", f"spk{s}")))
    return dict(rows)


def test_label_fractions_are_nested_and_deterministic(tmp_path):
    utterances = write_features(tmp_path)
    selection = select_utterances(utterances)
    for task in ("phone", "speaker"):
        trains = {
            f: set(task_data(tmp_path, task, utterances, selection, f, seed=3).splits["train"].ids)
            for f in (0.1, 0.5, 1.0)
        }
        assert trains[0.1] < trains[0.5] < trains[1.0]
        again = task_data(tmp_path, task, utterances, selection, 0.5, seed=3)
        assert set(again.splits["train"].ids) == trains[0.5]
        other_seed = task_data(tmp_path, task, utterances, selection, 0.5, seed=4)
        assert set(other_seed.splits["train"].ids) != trains[0.5]
    phone = task_data(tmp_path, "phone", utterances, selection)
    # utterances whose labels are all -1 (no transcript) take no part in the phone task
    assert all(int(utt[-2:]) % 3 != 0 for utt in phone.splits["train"].ids)
    speaker = task_data(tmp_path, "speaker", utterances, selection, 0.1)
    assert speaker.classes == [f"spk{s}" for s in range(6)]  # all train classes at every fraction
    assert len(speaker.splits["train"]) == 6  # ceil(0.1 * 60)
