"""Length-bucketed batches of feature-store utterances, sharded across DDP ranks and resumable.

Batches are sized by frames, not utterances: within large shuffled pools the utterances are
sorted by length and packed greedily while `batch size x longest utterance` (the padded size
the GPU actually computes on) stays under `max_frames_per_batch`. Sorting inside a pool keeps
padding low; shuffling the pools and then the batches keeps the order random from epoch to epoch.

Everything random (pool shuffle, batch order, crop offsets) is drawn from a numpy generator
seeded by `(seed, epoch)`, so the batches of an epoch are a pure function of the epoch number:
a resumed run asks for `(epoch, batch index)` and gets exactly the batches it would have seen,
and every DDP rank computes the same global list and takes its own disjoint share.

A batch is a list of `(utterance index, crop start, crop stop)` items; the dataset slices the
memory map with them, so the crop is decided here (seeded) and applied when the batch is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mockingjay.featstore import RaggedArray, is_store
from mockingjay.store_layout import target_store

BatchItem = tuple[int, int, int]  # (utterance index, first frame, end frame)


class LengthBucketBatchSampler:
    """Yields this rank's batches of one epoch, from a given batch index on.

    `set_epoch(epoch, start_batch)` positions the sampler; iterating yields
    `epoch_batches(epoch)[start_batch:]` for this rank. Every rank gets the same number of
    batches per epoch (DDP would hang otherwise): when the global count does not divide by the
    world size, the fullest batches are split in two until it does (no utterance is dropped);
    only if that is impossible (single-utterance batches) are the last few batches dropped.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_frames_per_batch: int,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        pool_size: int = 2048,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-d sequence of utterance lengths")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if max_batch_size is not None and max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        if pool_size <= 0:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.max_length = max_length
        self.effective_lengths = (
            np.minimum(self.lengths, max_length) if max_length is not None else self.lengths.copy()
        )
        longest = int(self.effective_lengths.max())
        if max_frames_per_batch < longest:
            raise ValueError(
                f"max_frames_per_batch={max_frames_per_batch} is smaller than the longest "
                f"{'cropped ' if max_length is not None else ''}utterance ({longest} frames); "
                "raise max_frames_per_batch or lower max_length"
            )
        self.max_frames_per_batch = int(max_frames_per_batch)
        self.max_batch_size = max_batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.pool_size = int(pool_size)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[BatchItem]]] | None = None
        if len(self.epoch_batches(0)) == 0:
            raise ValueError(
                f"{len(self.lengths)} utterances cannot feed {world_size} ranks one batch each"
            )

    # -- positioning -------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the sampler at batch `start_batch` of `epoch` (for resuming)."""
        if not 0 <= start_batch <= len(self.epoch_batches(epoch)):
            raise ValueError(f"start_batch {start_batch} is outside epoch {epoch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[BatchItem]]:
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        """Batches left in the current epoch from the current position."""
        return len(self.epoch_batches(self.epoch)) - self.start_batch

    def batches_per_epoch(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch))

    # -- the batches of an epoch -------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[BatchItem]]:
        """This rank's batches of `epoch`, in order."""
        if self._cache is None or self._cache[0] != epoch:
            global_batches = self.global_batches(epoch)
            self._cache = (epoch, global_batches[self.rank :: self.world_size])
        return self._cache[1]

    def global_batches(self, epoch: int) -> list[list[BatchItem]]:
        """All ranks' batches of `epoch`, trimmed to a multiple of the world size."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.lengths)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        starts = self._crop_starts(rng)
        batches: list[list[BatchItem]] = []
        for pool_start in range(0, count, self.pool_size):
            pool = order[pool_start : pool_start + self.pool_size]
            # Longest first, so the first utterance of a batch sets its padded length.
            pool = pool[np.argsort(-self.effective_lengths[pool], kind="stable")]
            batches.extend(self._pack(pool, starts))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._balance(batches)

    def _crop_starts(self, rng: np.random.Generator) -> np.ndarray:
        """First frame of each utterance's crop: uniform when shuffling, 0 otherwise."""
        spare = self.lengths - self.effective_lengths  # frames that do not fit under max_length
        if not self.shuffle:
            return np.zeros_like(spare)
        return np.floor(rng.random(len(spare)) * (spare + 1)).astype(np.int64)

    def _pack(self, pool: np.ndarray, starts: np.ndarray) -> list[list[BatchItem]]:
        batches: list[list[BatchItem]] = []
        batch: list[BatchItem] = []
        longest = 0
        cap_utterances = self.max_batch_size or len(self.lengths)
        for index in pool.tolist():
            length = int(self.effective_lengths[index])
            padded = (len(batch) + 1) * max(longest, length)
            if batch and (padded > self.max_frames_per_batch or len(batch) >= cap_utterances):
                batches.append(batch)
                batch, longest = [], 0
            start = int(starts[index])
            batch.append((index, start, start + length))
            longest = max(longest, length)
        if batch:
            batches.append(batch)
        return batches

    def _balance(self, batches: list[list[BatchItem]]) -> list[list[BatchItem]]:
        """Split the fullest batches until the count divides by the world size (else drop)."""
        while len(batches) % self.world_size:
            fullest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches[fullest]
            if len(batch) < 2:
                break
            half = len(batch) // 2
            batches[fullest : fullest + 1] = [batch[:half], batch[half:]]
        return batches[: len(batches) - len(batches) % self.world_size]


# -- the dataset: utterances read from memory-mapped feature stores -----------------------


def default_target_path(input_path: str | Path) -> Path | None:
    """The target store beside an input store (`train` -> `train_target`), if one exists."""
    candidate = target_store(input_path)
    return candidate if is_store(candidate) else None


class FeatureBatch(NamedTuple):
    """A padded batch. `targets` is None when the target is the input itself."""

    inputs: torch.Tensor  # [B, T, input_dim] in the store's dtype (float16), zero-padded
    targets: torch.Tensor | None  # [B, T, target_dim] in the store's dtype, or None
    lengths: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], utterance indices in the dataset


class FeatureDataset(Dataset):
    """Utterances of one or more feature stores, concatenated, with optional target stores.

    Items are `(index, start, stop)` crops as yielded by `LengthBucketBatchSampler` (a plain
    int means the whole utterance). Stores are opened lazily and dropped when pickled, so
    DataLoader workers map the files themselves instead of receiving copies of the data.
    """

    def __init__(
        self,
        input_paths: str | Path | Sequence[str | Path],
        target_paths: Sequence[str | Path | None] | None = None,
    ):
        if isinstance(input_paths, (str, Path)):
            input_paths = [input_paths]
        self.input_paths = [Path(p) for p in input_paths]
        if not self.input_paths:
            raise ValueError("no feature store given")
        if target_paths is None:
            target_paths = [default_target_path(p) for p in self.input_paths]
        if len(target_paths) != len(self.input_paths):
            raise ValueError("give one target path (or None) per input store")
        self.target_paths = [Path(p) if p is not None else None for p in target_paths]
        self._stores: list[tuple[RaggedArray, RaggedArray | None]] | None = None
        stores = self._open()
        self.input_dim = stores[0][0].dim
        self.has_targets = any(target is not None for _, target in stores)
        if self.has_targets and not all(target is not None for _, target in stores):
            raise ValueError("either every input store has a target store or none has")
        self.target_dim = stores[0][1].dim if self.has_targets else self.input_dim
        for inputs, targets in stores:
            if inputs.dim != self.input_dim:
                raise ValueError(f"{inputs.path}: dim {inputs.dim}, expected {self.input_dim}")
            if targets is not None:
                if targets.dim != self.target_dim:
                    raise ValueError(
                        f"{targets.path}: dim {targets.dim}, expected {self.target_dim}"
                    )
                if targets.ids != inputs.ids or not np.array_equal(targets.lengths, inputs.lengths):
                    raise ValueError(f"{targets.path}: ids or lengths differ from {inputs.path}")
        self.ids: list[str] = [item_id for inputs, _ in stores for item_id in inputs.ids]
        self.lengths = np.concatenate([inputs.lengths for inputs, _ in stores])
        sizes = [len(inputs) for inputs, _ in stores]
        self._store_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _open(self) -> list[tuple[RaggedArray, RaggedArray | None]]:
        if self._stores is None:
            self._stores = [
                (RaggedArray(inputs), RaggedArray(targets) if targets is not None else None)
                for inputs, targets in zip(self.input_paths, self.target_paths)
            ]
        return self._stores

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stores"] = None
        return state

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, item: BatchItem | int) -> tuple[int, np.ndarray, np.ndarray | None]:
        if isinstance(item, (int, np.integer)):
            item = (int(item), 0, int(self.lengths[item]))
        index, start, stop = item
        store_number = int(np.searchsorted(self._store_offsets, index, side="right")) - 1
        local = index - int(self._store_offsets[store_number])
        inputs, targets = self._open()[store_number]
        target_rows = targets[local][start:stop] if targets is not None else None
        return index, inputs[local][start:stop], target_rows


def collate_features(items: Sequence[tuple[int, np.ndarray, np.ndarray | None]]) -> FeatureBatch:
    """Pad memmap slices into tensors [B, Tmax, D] plus lengths, keeping the store's dtype.

    Float16 stays float16 until it is on the device: half the bytes to pad, pin and copy (the
    padding alone is about 5x faster than into float32), and the conversion there is exact.
    """
    lengths = [rows.shape[0] for _, rows, _ in items]
    longest = max(lengths)

    def pad(rows_of: list[np.ndarray]) -> torch.Tensor:
        padded = np.zeros((len(rows_of), longest, rows_of[0].shape[1]), dtype=rows_of[0].dtype)
        for b, rows in enumerate(rows_of):
            padded[b, : rows.shape[0]] = rows
        return torch.from_numpy(padded)

    inputs = pad([rows for _, rows, _ in items])
    targets = pad([t for _, _, t in items]) if items[0][2] is not None else None
    return FeatureBatch(
        inputs=inputs,
        targets=targets,
        lengths=torch.tensor(lengths, dtype=torch.int64),
        indices=torch.tensor([index for index, _, _ in items], dtype=torch.int64),
    )


def make_loader(
    dataset: Dataset,
    sampler: LengthBucketBatchSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    collate_fn=collate_features,
) -> DataLoader:
    """A DataLoader over `sampler`'s batches (call `sampler.set_epoch` before each `iter`).

    The loader gets its own generator so creating an iterator never draws from the global
    torch RNG (which would make a resumed run diverge from an uninterrupted one). Pass
    `multiprocessing_context="forkserver"` once CUDA is initialised: forking a process that
    runs CUDA threads can deadlock the workers.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(sampler.seed),
        prefetch_factor=4 if num_workers > 0 else None,
        # The sampler runs in this process, so workers can persist across epochs.
        persistent_workers=num_workers > 0,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
