"""The training loop that pretraining and fine-tuning share: CPU or GPU, one process or DDP under
torchrun, resumable bit for bit.

`TrainingLoop` owns everything that does not depend on the objective: the process group, the
device and autocast policy, AdamW over the parameter groups the objective gives, the warm-up/decay
schedule, the length-bucketed data pipeline, gradient accumulation and clipping, the inf/NaN
checks, checkpoints (weights + optimizer, scheduler, data position and every random stream) and
resuming from the newest complete one, the sync points where the few numbers reported are read,
and the progress bar. A subclass says what is trained and how it is scored:

* `build_model()`: the module, built under the run's seed (identical on every rank and rerun);
* `parameter_groups()`: AdamW's groups (default: decay on matrices, none on vectors, one rate);
* `batch_loss(module, batch, generator)`: `(loss, count)`; count 0 marks a batch with nothing to
  learn from (it is counted as skipped);
* `evaluate()`: the held-out number logged at step 0, at `eval_every` and at the end (or None);
* `config_sections()`: its sections of every checkpoint's and the final model's config.json,
  beside "model" (`self.model_config`) and "training".

Logging goes through `callback(dict)` on rank 0; a tqdm bar on stderr shows progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mockingjay.batching import LengthBucketBatchSampler, collate_features, make_loader
from mockingjay.checkpoint import latest_checkpoint, save_checkpoint, save_model_dir
from mockingjay.device import autocast_dtype, resolve_device, wants_cuda
from mockingjay.distributed import setup_distributed
from mockingjay.schedule import warmup_linear_decay
from mockingjay.tensor_files import capture_rng_state
from mockingjay.train_config import TrainConfig
from mockingjay.training_state import (  # noqa: F401  (NonFiniteLossError, TrainingStopped: re-exported)
    NonFiniteLossError,
    Tally,
    TrainingStopped,
    nonfinite_error,
    restore_state,
    state_of,
)

Callback = Callable[[dict[str, Any]], None]


class TrainingLoop:
    """One training run; `fit()` returns the result dict. `self.model` is the plain module.

    `train_data` is a dataset with `lengths` (frames per item) whose items `collate` pads into a
    batch with `.lengths` (host int64). Checkpoints go to `checkpoints_dir`, the final model to
    `model_dir`; `extra_config` sections (e.g. "features") are added to their config.json.
    `should_stop()` returning True ends the run with TrainingStopped after a checkpoint.
    """

    progress_name = "train"  # the progress bar's label

    def __init__(
        self,
        train_config: TrainConfig,
        train_data,
        checkpoints_dir: str | Path,
        model_dir: str | Path,
        *,
        frame_rate: float,
        collate: Callable = collate_features,
        extra_config: dict[str, Any] | None = None,
        callback: Callback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        train_config.validate()
        self.config = train_config
        self.train_data, self.collate = train_data, collate
        self.frame_rate = frame_rate
        self.checkpoints_dir, self.model_dir = Path(checkpoints_dir), Path(model_dir)
        self.extra_config = dict(extra_config or {})
        self.callback = callback
        # Asked after every step (one process) or at every sync point (DDP, where all ranks must
        # agree on the step): True stops the run with a checkpoint of the step reached.
        self.should_stop = should_stop

    # -- what a subclass says ----------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's groups: weight decay on matrices only (not biases and LayerNorm), one rate."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {
                "params": [p for p in trainable if p.ndim >= 2],
                "weight_decay": self.config.weight_decay,
            },
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]

    def batch_loss(self, module: torch.nn.Module, batch, generator: torch.Generator):
        """(loss, count) of one micro-batch through `module` (the DDP/compiled wrapper in training)."""
        raise NotImplementedError

    def evaluate(self) -> float | None:
        return None

    def config_sections(self) -> dict[str, Any]:
        """The objective's own sections of config.json (e.g. "mask"), beside "model" and "training"."""
        return {}

    def config_record(self) -> dict[str, Any]:
        """config.json of every checkpoint and of the final model (`self.model_config` is the
        encoder's ModelConfig)."""
        return {
            **self.extra_config,
            "model": self.model_config.to_dict(),
            **self.config_sections(),
            "training": self.config.to_dict(),
        }

    def save_final(self) -> None:
        save_model_dir(
            self.model_dir,
            self.model,
            self.model_config,
            extra={k: v for k, v in self.config_record().items() if k != "model"},
        )

    def ddp_options(self) -> dict[str, Any]:
        """Extra DistributedDataParallel arguments (e.g. find_unused_parameters)."""
        return {}

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        self.dist = setup_distributed(wants_cuda(cfg.device))
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.autocast_dtype = autocast_dtype(self.device, cfg.precision)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every rerun
        self.model = self.build_model().to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.parameter_groups(),
            lr=cfg.learning_rate,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            fused=self.device.type == "cuda",
        )
        self.scheduler = warmup_linear_decay(self.optimizer, cfg.total_steps, cfg.warmup_proportion)
        self.sampler = LengthBucketBatchSampler(
            self.train_data.lengths,
            cfg.max_frames_per_batch,
            cfg.max_batch_size,
            cfg.max_length,
            seed=cfg.seed,
            pool_size=cfg.bucket_pool_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        num_workers = cfg.num_workers
        if num_workers is None:  # the collate (memmap -> padded float32) must keep up with a GPU
            num_workers = min(4, (os.cpu_count() or 2) // 2) if self.device.type == "cuda" else 0
        on_gpu = self.device.type == "cuda"
        self.loader = make_loader(
            self.train_data,
            self.sampler,
            num_workers,
            pin_memory=on_gpu,
            multiprocessing_context="forkserver" if on_gpu else None,
            collate_fn=self.collate,
        )
        self.mask_generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed + 7919 * self.dist.rank
        )
        self.step = self.epoch = self.batch_in_epoch = self.skipped_before = 0
        self.heldout_loss_initial: float | None = None
        self.resumed_from = latest_checkpoint(self.checkpoints_dir)
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        module: torch.nn.Module = self.model
        if self.dist.enabled:
            module = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **self.ddp_options(),
            )
        self.ddp = module if self.dist.enabled else None
        self.train_module = torch.compile(module) if cfg.compile else module

    def _resume(self, path: Path) -> None:
        restore_state(self, path)
        self._emit({"event": "resume", "step": self.step, "path": str(path)})

    # -- helpers -----------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self.callback is not None and self.dist.is_main:
            self.callback(record)

    def _batches(self):
        """Endless stream of batches; (epoch, batch_in_epoch) always points past the last one."""
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _sum_over_ranks(self, values: list[torch.Tensor | float]) -> list[float]:
        """Sum per-rank numbers (one all-reduce) and read them on the host: a sync point."""
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        if self.dist.enabled:
            dist.all_reduce(stacked)
        return stacked.tolist()

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, skipped_total: int) -> Path | None:
        local = {"rng": capture_rng_state(), "mask_generator": self.mask_generator.get_state()}
        per_rank = [local]
        if self.dist.enabled:
            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, local)
        path = None
        if self.dist.is_main:
            state = state_of(self, skipped_total, per_rank)
            path = save_checkpoint(
                self.checkpoints_dir,
                self.step,
                self.model,
                self.config_record(),
                state,
                keep_last=self.config.keep_checkpoints,
            )
            self._emit({"event": "checkpoint", "step": self.step, "path": str(path)})
        if self.dist.enabled:
            dist.barrier()  # no rank runs ahead (or exits) while rank 0 is still writing
        return path

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._setup()
        try:
            return self._fit()
        finally:
            if self.dist.owns_group:
                dist.destroy_process_group()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.resumed_from is None:
            self.heldout_loss_initial = self.evaluate()
        batches = self._batches()
        tally = Tally(
            *(
                torch.zeros((), dtype=dtype, device=self.device)
                for dtype in (torch.float64, torch.int64, torch.bool, torch.float32)
            )
        )
        start_step, run_start, self.last_good = self.step, tally.start, self.resumed_from
        # One process on CPU: reading the flags every step costs nothing, so a bad step never updates.
        sync_every_step = self.device.type == "cpu" and not self.dist.enabled
        progress = tqdm(
            total=cfg.total_steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.is_main),
            file=sys.stderr,
            desc=self.progress_name,
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        while self.step < cfg.total_steps:
            self._train_step(batches, tally, check_now=sync_every_step)
            progress.update(1)
            self._sync_point(tally, progress)
        progress.close()
        run_seconds = time.perf_counter() - run_start - tally.paused
        return self._finish(tally, start_step, run_seconds)

    def _train_step(self, batches, tally: Tally, check_now: bool) -> None:
        """One optimizer step over `grad_accumulation` micro-batches; adds to `tally`, never syncs
        unless `check_now` (then an inf/NaN stops the run before the update)."""
        cfg = self.config
        for micro in range(cfg.grad_accumulation):
            batch = next(batches)
            frames = int(batch.lengths.sum())  # host tensor: no device sync
            tally.frames, tally.run_frames = tally.frames + frames, tally.run_frames + frames
            last_micro = micro == cfg.grad_accumulation - 1
            no_sync = (
                self.ddp.no_sync()
                if self.ddp is not None and not last_micro
                else contextlib.nullcontext()
            )
            with no_sync:
                loss, count = self.batch_loss(self.train_module, batch, self.mask_generator)
                (loss / cfg.grad_accumulation).backward()
            tally.skipped += count == 0  # such a batch has loss 0 and zero gradient
            tally.nonfinite |= ~torch.isfinite(loss)
            tally.loss += loss.detach().double()
            tally.micro_batches += 1
        tally.grad_norm = (
            torch.nn.utils.clip_grad_norm_(  # parameters without a gradient are left out
                self.model.parameters(), cfg.grad_clip or math.inf
            )
        )
        tally.nonfinite |= ~torch.isfinite(tally.grad_norm)
        if check_now and bool(tally.nonfinite):
            self._raise_nonfinite(self.step + 1)  # before the update: the weights stay clean
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _sync_point(self, tally: Tally, progress) -> None:
        """At log, evaluation, checkpoint and stop steps (the same on every rank): read the
        interval's numbers once, log, evaluate, checkpoint, and stop if asked."""
        cfg = self.config
        is_log = self.step % cfg.log_every == 0 or self.step == cfg.total_steps
        is_eval = (
            cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step < cfg.total_steps
        )
        is_checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps
        stop = self.should_stop is not None and not self.dist.enabled and self.should_stop()
        if not (is_log or is_eval or is_checkpoint or stop):
            return
        wants_stop = float(self.should_stop is not None and self.should_stop())
        loss_sum, micro_batches, frames_sum, skipped_sum, bad, norm, stops = self._sum_over_ranks(
            [
                tally.loss,
                float(tally.micro_batches),
                float(tally.frames),
                tally.skipped,
                tally.nonfinite,
                tally.grad_norm,
                wants_stop,
            ]
        )
        if bad:
            self._raise_nonfinite(self.step)
        stop = stop or stops > 0
        skipped_total = self.skipped_before + int(skipped_sum)
        if is_log:
            now = time.perf_counter()
            tally.last_loss = loss_sum / max(micro_batches, 1.0)
            record = {
                "event": "train",
                "step": self.step,
                "epoch": self.epoch,
                "loss": tally.last_loss,
                "learning_rate": self.scheduler.get_last_lr()[0],
                "grad_norm": norm / self.dist.world_size,
                "skipped_batches": skipped_total,
                "audio_seconds_per_second": frames_sum
                / self.frame_rate
                / max(now - tally.start, 1e-9),
            }
            self._emit(record)
            progress.set_postfix(
                loss=f"{tally.last_loss:.4f}", lr=f"{record['learning_rate']:.2e}", refresh=False
            )
            tally.loss.zero_()
            tally.micro_batches = tally.frames = 0
            tally.start = now
        pause_start = time.perf_counter()
        if is_eval:
            self.evaluate()
        if is_checkpoint or stop:
            self.last_good = self._checkpoint(skipped_total) or self.last_good
        if stop:
            progress.close()
            raise TrainingStopped(self.step, self.last_good)
        paused = time.perf_counter() - pause_start  # kept out of the throughput figures
        tally.start, tally.paused = tally.start + paused, tally.paused + paused

    def _finish(self, tally: Tally, start_step: int, run_seconds: float) -> dict[str, Any]:
        """Final held-out number, the model directory, and the run's result dict."""
        skipped_total = self.skipped_before + int(self._sum_over_ranks([tally.skipped])[0])
        heldout_loss_final = self.evaluate()
        if self.dist.is_main:
            self.save_final()
        if self.dist.enabled:
            dist.barrier()
        # unpadded seconds, after cropping
        seen = tally.run_frames * self.dist.world_size / self.frame_rate
        result = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "epoch": self.epoch,
            "train_loss_final": tally.last_loss,
            "heldout_loss_initial": self.heldout_loss_initial,
            "heldout_loss_final": heldout_loss_final,
            "skipped_batches": skipped_total,
            "audio_seconds_per_second": seen / max(run_seconds, 1e-9),
            "audio_seconds_seen": seen,
            "train_seconds": run_seconds,
            "model_dir": str(self.model_dir),
            "last_checkpoint": str(self.last_good) if self.last_good else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }
        self._emit({"event": "done", **result})
        return result

    def _raise_nonfinite(self, step: int) -> None:
        raise nonfinite_error(self, step)
