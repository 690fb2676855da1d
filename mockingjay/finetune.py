"""Fine-tuning: the pretrained encoder and a downstream head trained jointly on a labelled task
(the paper's BASE-FT2), on the training loop pretraining uses.

`FineTuner(...).fit()` trains one task and variant (`mockingjay.finetune_config`) to
`total_steps` with everything the loop gives (checkpoints, bitwise resume, DDP, clipping, bf16
autocast on CUDA, inf/NaN checks). What is particular to fine-tuning:

* two learning rates under one warm-up/decay schedule: the encoder's
  (`FinetuneConfig.encoder_learning_rate`) and the head's (`TrainConfig.learning_rate`);
* the encoder frozen (eval mode, no graph) for the first `freeze_encoder_steps` steps, or always
  (`frozen`); the input representation optionally frozen throughout;
* SpecAugment-style masking of the inputs, drawn with the pretraining masking code;
* cross-entropy over labelled frames (phone) or utterances (speaker, keyword); the held-out number
  is the dev cross-entropy, with the dev accuracy logged beside it.

`predict` scores a model on a split (no cropping: every frame of every utterance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mockingjay.batching import LengthBucketBatchSampler, make_loader
from mockingjay.checkpoint import encoder_state
from mockingjay.classifier import MockingjayForClassification
from mockingjay.device import autocast
from mockingjay.finetune_config import FinetuneConfig
from mockingjay.finetune_data import IGNORE, LabelledDataset, collate_labelled
from mockingjay.mask_config import MaskConfig
from mockingjay.masking import mask_batch
from mockingjay.model import ModelConfig
from mockingjay.train_config import TrainConfig
from mockingjay.training_loop import Callback, TrainingLoop


class FineTuner(TrainingLoop):
    """One fine-tuning run. `pretrained_dir` is the model directory whose encoder `finetuned` and
    `frozen` start from (unused by `scratch` and `logmel`); `model_config` its encoder's config."""

    progress_name = "finetune"

    def __init__(
        self,
        model_config: ModelConfig,
        config: FinetuneConfig,
        train_config: TrainConfig,
        train_data: LabelledDataset,
        dev_data: LabelledDataset | None,
        checkpoints_dir: str | Path,
        model_dir: str | Path,
        *,
        pretrained_dir: str | Path | None = None,
        frame_rate: float = 100.0,
        extra_config: dict[str, Any] | None = None,
        callback: Callback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        if config.pretrained and pretrained_dir is None:
            raise ValueError(f"the {config.variant} variant needs the pretrained model directory")
        super().__init__(
            train_config,
            train_data,
            checkpoints_dir,
            model_dir,
            frame_rate=frame_rate,
            collate=collate_labelled,
            extra_config=extra_config,
            callback=callback,
            should_stop=should_stop,
        )
        self.model_config, self.finetune = model_config, config
        self.pretrained_dir = Path(pretrained_dir) if pretrained_dir is not None else None
        self.dev_data = dev_data
        augment = config.augment
        self.augment = (
            MaskConfig(
                mask_proportion=augment.time_mask_proportion,
                span_length=augment.span_length,
                zero_prob=1.0,
                random_prob=0.0,
                freq_mask_proportion=augment.freq_mask_proportion,
            )
            if augment.enabled
            else None
        )

    # -- the objective -------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        model = MockingjayForClassification(self.model_config, self.finetune)
        if self.finetune.pretrained:
            model.encoder.load_state_dict(encoder_state(self.pretrained_dir), strict=True)
        if self.finetune.variant == "frozen":  # never trained: DDP and AdamW leave it out
            model.encoder.requires_grad_(False)
        return model

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = []
        for module, rate in (
            (self.model.encoder, self.finetune.encoder_learning_rate),
            (self.model.head, self.config.learning_rate),
        ):
            if module is None:
                continue
            trainable = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in trainable if p.ndim >= 2]
            no_decay = [p for p in trainable if p.ndim < 2]
            groups += [
                {"params": decay, "weight_decay": self.config.weight_decay, "lr": rate},
                {"params": no_decay, "weight_decay": 0.0, "lr": rate},
            ]
        return [g for g in groups if g["params"]]

    def ddp_options(self) -> dict[str, Any]:
        # While frozen for the first k steps the encoder's parameters get no gradient.
        return {"find_unused_parameters": self.finetune.freeze_encoder_steps > 0}

    def _logits(self, module, batch, generator, train: bool):
        inputs = batch.inputs.to(self.device, non_blocking=True).float()
        lengths = batch.lengths.to(self.device, non_blocking=True)
        if train and self.augment is not None:
            inputs = mask_batch(
                inputs, lengths, self.augment, self.model_config.downsample_rate, generator
            ).inputs
        unpadded = int(batch.lengths.min()) == inputs.size(1)
        frozen = self.finetune.encoder_frozen_at(self.step) or not train
        if train and self.model.encoder is not None:
            self.model.encoder.train(not frozen)  # a frozen encoder runs without dropout
        with autocast(self.device, self.config.precision):
            return module(inputs, None if unpadded else lengths, encoder_grad=not frozen)

    def batch_loss(self, module, batch, generator):
        logits = self._logits(module, batch, generator, train=True)
        return _cross_entropy(logits, batch.targets.to(self.device, non_blocking=True))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Dev cross-entropy (every rank scores the whole dev split: no collective needed)."""
        if self.dev_data is None or len(self.dev_data) == 0:
            return None
        self.model.eval()
        try:
            total, count, correct = 0.0, 0, 0
            for batch in _eval_batches(self.dev_data, self.config):
                logits = self._logits(self.model, batch, None, train=False)
                targets = batch.targets.to(self.device)
                loss, n = _cross_entropy(logits, targets)
                total, count = total + float(loss) * int(n), count + int(n)
                correct += int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())
        finally:
            self.model.train()
        value = total / max(count, 1)
        self._emit(
            {
                "event": "eval",
                "step": self.step,
                "heldout_loss": value,
                "dev_accuracy": correct / max(count, 1),
            }
        )
        return value

    def config_sections(self) -> dict[str, Any]:
        return {"finetune": self.finetune.to_dict()}


def _cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled positions -> (loss, their number); fp32."""
    logits = logits.float().reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    count = (targets != IGNORE).sum()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return loss / count.clamp_min(1), count


def _eval_batches(dataset: LabelledDataset, config: TrainConfig):
    """Whole utterances (no crop), sorted by length, at most `max_frames_per_batch` padded frames
    a batch (a longer utterance goes alone)."""
    longest = int(dataset.lengths.max()) if len(dataset) else 1
    sampler = LengthBucketBatchSampler(
        dataset.lengths,
        max(config.max_frames_per_batch, longest),
        config.max_batch_size,
        None,
        shuffle=False,
    )
    sampler.set_epoch(0, 0)
    return make_loader(dataset, sampler, collate_fn=collate_labelled)


@torch.no_grad()
def predict(
    model: MockingjayForClassification,
    dataset: LabelledDataset,
    config: TrainConfig,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(truth, predicted) class ids of every labelled frame (frame tasks) or utterance."""
    model.eval()
    truths, predictions = [], []
    for batch in _eval_batches(dataset, config):
        inputs = batch.inputs.to(device).float()
        lengths = batch.lengths.to(device)
        with autocast(device, config.precision):
            logits = model(inputs, lengths)
        targets = batch.targets.reshape(-1)
        predicted = logits.argmax(-1).reshape(-1).cpu()
        keep = targets != IGNORE
        truths.append(targets[keep].numpy())
        predictions.append(predicted[keep].numpy())
    if not truths:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(truths), np.concatenate(predictions)


def finetune(*args, **kwargs) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning): `FineTuner(*args, **kwargs).fit()`."""
    return FineTuner(*args, **kwargs).fit()
