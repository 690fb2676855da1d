"""MAM pretraining: the masked acoustic model objective on the shared training loop.

`Trainer(...).fit()` (or `train(...)`) builds the model, the length-bucketed data pipeline, AdamW
and the warm-up/decay schedule, resumes from the newest complete checkpoint in `checkpoints_dir`,
and trains to `total_steps` (all of that is `mockingjay.training_loop.TrainingLoop`). This module
adds what is particular to pretraining: `MockingjayForMAM`, masking on the device, the masked L1
loss and the held-out masked L1. Everything stochastic (data order, crops, masks, dropout) is
seeded and checkpointed, so a run interrupted and resumed ends with the same weights as one that
was not (bitwise on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mockingjay.batching import FeatureDataset, LengthBucketBatchSampler, make_loader
from mockingjay.device import autocast
from mockingjay.masking import MaskConfig, mam_l1_loss, mask_batch
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.train_config import TrainConfig, TrainData
from mockingjay.training_loop import (  # noqa: F401  (re-exported: the stage catches them)
    Callback,
    NonFiniteLossError,
    TrainingLoop,
    TrainingStopped,
)

EVAL_SEED_OFFSET = 1_000_003  # held-out masks come from their own fixed stream


class Trainer(TrainingLoop):
    """One pretraining run; `fit()` returns the result dict. `model` is the plain module.

    Checkpoints go to `checkpoints_dir`, the final model to `model_dir`; `extra_config` sections
    (e.g. "features") are added to their config.json. `should_stop()` returning True ends the run
    with TrainingStopped after a checkpoint of the step reached.
    """

    progress_name = "pretrain"

    def __init__(
        self,
        model_config: ModelConfig,
        mask_config: MaskConfig,
        train_config: TrainConfig,
        data: TrainData,
        checkpoints_dir: str | Path,
        model_dir: str | Path,
        *,
        extra_config: dict[str, Any] | None = None,
        callback: Callback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        model_config.validate()
        mask_config.validate()
        super().__init__(
            train_config,
            FeatureDataset(data.train, data.train_targets),
            checkpoints_dir,
            model_dir,
            frame_rate=data.frame_rate,
            extra_config=extra_config,
            callback=callback,
            should_stop=should_stop,
        )
        self.model_config, self.mask_config = model_config, mask_config
        self.heldout_data = (
            FeatureDataset(data.heldout, [data.heldout_target] if data.heldout_target else None)
            if data.heldout is not None
            else None
        )
        for name, store in (("train", self.train_data), ("held-out", self.heldout_data)):
            if store is not None and (store.input_dim, store.target_dim) != (
                model_config.input_dim,
                model_config.target_dim,
            ):
                raise ValueError(
                    f"{name} features are {store.input_dim}-d in, {store.target_dim}-d target; the model "
                    f"expects input_dim={model_config.input_dim}, target_dim={model_config.target_dim}"
                )

    def build_model(self) -> torch.nn.Module:
        return MockingjayForMAM(self.model_config)

    def batch_loss(
        self, module: torch.nn.Module, batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Batches come in the store's float16 and become float32 on the device (exact).
        inputs = batch.inputs.to(self.device, non_blocking=True).float()
        targets = (
            batch.targets.to(self.device, non_blocking=True).float()
            if batch.targets is not None
            else inputs
        )
        lengths = batch.lengths.to(self.device, non_blocking=True)
        # Decided on the host from the collate's lengths: no padding lets attention skip its mask.
        unpadded = int(batch.lengths.min()) == inputs.size(1)
        masked = mask_batch(
            inputs, lengths, self.mask_config, self.model_config.downsample_rate, generator
        )
        with autocast(self.device, self.config.precision):
            predictions = module(masked.inputs, None if unpadded else lengths)
        return mam_l1_loss(predictions, targets, masked.target_loss_mask(targets.size(-1)))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Masked L1 on the held-out store, same fixed masks every call (seeded generator)."""
        if self.heldout_data is None:
            return None
        cfg = self.config
        lengths = self.heldout_data.lengths[: cfg.eval_max_utterances]
        sampler = LengthBucketBatchSampler(
            lengths,
            cfg.max_frames_per_batch,
            cfg.max_batch_size,
            cfg.max_length,
            shuffle=False,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        loader = make_loader(
            self.heldout_data, sampler, num_workers=0, pin_memory=self.device.type == "cuda"
        )
        generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed + EVAL_SEED_OFFSET + self.dist.rank
        )
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for batch in loader:
                    loss, num_masked = self.batch_loss(self.model, batch, generator)
                    total += loss.double() * num_masked
                    count += num_masked
        finally:
            self.model.train()
        total_sum, count_sum = self._sum_over_ranks([total, count])
        value = total_sum / max(count_sum, 1.0)
        self._emit({"event": "eval", "step": self.step, "heldout_loss": value})
        return value

    def config_sections(self) -> dict[str, Any]:
        return {"mask": self.mask_config.to_dict()}


def train(*args, **kwargs) -> dict[str, Any]:
    """Pretrain (or resume pretraining) a Mockingjay model: `Trainer(*args, **kwargs).fit()`."""
    return Trainer(*args, **kwargs).fit()
