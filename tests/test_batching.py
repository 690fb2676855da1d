from pathlib import Path

import numpy as np
import pytest
import torch

from mockingjay.batching import (
    FeatureDataset,
    LengthBucketBatchSampler,
    collate_features,
    default_target_path,
    make_loader,
)
from mockingjay.featstore import RaggedWriter


def write_store(
    path: Path, lengths, dim: int = 4, seed: int = 0, prefix: str = "u"
) -> list[np.ndarray]:
    """A store whose rows encode (utterance, frame) so crops can be checked exactly."""
    rng = np.random.default_rng(seed)
    items = []
    with RaggedWriter(path, dim=dim) as writer:
        for i, length in enumerate(lengths):
            rows = rng.standard_normal((length, dim)).astype(np.float16)
            rows[:, 0] = np.arange(length) % 1000  # frame number, exact in float16
            writer.append(f"{prefix}{i:03d}", rows)
            items.append(rows)
    return items


def random_lengths(count: int, low: int = 5, high: int = 120, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=count)


def test_frame_cap_and_batch_size_are_respected():
    lengths = random_lengths(300)
    sampler = LengthBucketBatchSampler(
        lengths, max_frames_per_batch=400, max_batch_size=6, seed=3, pool_size=64
    )
    batches = sampler.epoch_batches(0)
    for batch in batches:
        padded = len(batch) * max(stop - start for _, start, stop in batch)
        assert padded <= 400
        assert len(batch) <= 6
    # Packing is tight: most batches are close to the cap or at the size limit.
    fill = np.mean([len(b) * max(s2 - s1 for _, s1, s2 in b) / 400 for b in batches if len(b) < 6])
    assert fill > 0.6


def test_every_utterance_once_per_epoch_and_order_changes_with_epoch():
    lengths = random_lengths(200)
    sampler = LengthBucketBatchSampler(lengths, max_frames_per_batch=500, seed=0, pool_size=50)
    orders = []
    for epoch in range(3):
        indices = [index for batch in sampler.epoch_batches(epoch) for index, _, _ in batch]
        assert sorted(indices) == list(range(200))
        orders.append(indices)
    assert orders[0] != orders[1] != orders[2]
    same_seed = LengthBucketBatchSampler(lengths, max_frames_per_batch=500, seed=0, pool_size=50)
    assert same_seed.epoch_batches(1) == sampler.epoch_batches(1)
    other_seed = LengthBucketBatchSampler(lengths, max_frames_per_batch=500, seed=1, pool_size=50)
    assert other_seed.epoch_batches(1) != sampler.epoch_batches(1)


def test_long_utterances_are_cropped_randomly_to_max_length():
    lengths = np.array([10, 40, 300, 500, 90])
    sampler = LengthBucketBatchSampler(lengths, max_frames_per_batch=100, max_length=50, seed=0)
    starts = {}
    for epoch in range(8):
        for batch in sampler.epoch_batches(epoch):
            for index, start, stop in batch:
                assert stop - start == min(lengths[index], 50)
                assert 0 <= start and stop <= lengths[index]
                starts.setdefault(index, set()).add(start)
    assert starts[0] == {0} and starts[1] == {0}  # short ones are never cropped
    assert len(starts[3]) > 1  # the crop offset is random across epochs


def test_collate_pads_crops_and_keeps_the_store_dtype(tmp_path):
    items = write_store(tmp_path / "train", [7, 30, 12], dim=4)
    dataset = FeatureDataset(tmp_path / "train")
    batch = collate_features([dataset[(1, 10, 25)], dataset[0], dataset[(2, 0, 12)]])
    assert batch.inputs.dtype == torch.float16 and batch.inputs.shape == (
        3,
        15,
        4,
    )  # float32 on the device
    assert batch.lengths.tolist() == [15, 7, 12] and batch.lengths.dtype == torch.int64
    assert batch.indices.tolist() == [1, 0, 2]
    assert batch.targets is None
    np.testing.assert_array_equal(batch.inputs[0].numpy(), items[1][10:25])
    np.testing.assert_array_equal(batch.inputs[1, :7].numpy(), items[0])
    assert torch.all(batch.inputs[1, 7:] == 0)  # padding is zeros


def test_batch_cap_below_one_utterance_is_an_error_naming_the_parameter():
    with pytest.raises(ValueError, match="max_frames_per_batch"):
        LengthBucketBatchSampler([10, 200], max_frames_per_batch=100)
    # ... unless cropping brings the utterance under the cap.
    LengthBucketBatchSampler([10, 200], max_frames_per_batch=100, max_length=100)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_shards_are_disjoint_equal_and_complete(world_size):
    lengths = random_lengths(101, seed=7)
    shards = [
        LengthBucketBatchSampler(
            lengths, 600, seed=5, pool_size=40, rank=rank, world_size=world_size
        )
        for rank in range(world_size)
    ]
    for epoch in range(3):
        per_rank = [shard.epoch_batches(epoch) for shard in shards]
        assert len({len(batches) for batches in per_rank}) == 1  # same count: DDP cannot hang
        seen = [[i for batch in batches for i, _, _ in batch] for batches in per_rank]
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert not set(seen[a]) & set(seen[b])
        # The remainder is balanced by splitting batches, so nothing is dropped.
        assert sorted(i for rank_seen in seen for i in rank_seen) == list(range(101))


def test_uneven_batch_count_is_split_not_dropped():
    lengths = [50] * 9  # 3 batches of 3 under the cap: odd for two ranks
    shards = [LengthBucketBatchSampler(lengths, 150, rank=r, world_size=2) for r in range(2)]
    counts = [len(shard.epoch_batches(0)) for shard in shards]
    assert counts == [2, 2]
    assert sorted(i for s in shards for b in s.epoch_batches(0) for i, _, _ in b) == list(range(9))


def test_resuming_mid_epoch_continues_the_same_order():
    lengths = random_lengths(120)
    sampler = LengthBucketBatchSampler(lengths, 400, seed=11)
    full = [list(sampler.epoch_batches(2))]
    resumed = LengthBucketBatchSampler(lengths, 400, seed=11)
    resumed.set_epoch(2, start_batch=5)
    assert len(resumed) == len(full[0]) - 5
    assert list(resumed) == full[0][5:]
    with pytest.raises(ValueError):
        resumed.set_epoch(2, start_batch=len(full[0]) + 1)


@pytest.mark.parametrize("num_workers, context", [(0, None), (2, "forkserver")])
def test_loader_yields_the_sampler_batches(tmp_path, num_workers, context):
    lengths = random_lengths(40, low=5, high=60)
    write_store(tmp_path / "train", lengths, dim=3)
    dataset = FeatureDataset(tmp_path / "train")
    sampler = LengthBucketBatchSampler(dataset.lengths, 200, max_length=40, seed=2)
    loader = make_loader(dataset, sampler, num_workers=num_workers, multiprocessing_context=context)
    sampler.set_epoch(1, 2)
    expected = sampler.epoch_batches(1)[2:]
    got = list(loader)
    # Persistent workers: the next epoch, positioned anew, comes through the same loader.
    sampler.set_epoch(2)
    assert [b.indices.tolist() for b in loader] == [
        [i for i, _, _ in items] for items in sampler.epoch_batches(2)
    ]
    assert len(got) == len(expected)
    for batch, items in zip(got, expected):
        assert batch.indices.tolist() == [i for i, _, _ in items]
        assert batch.lengths.tolist() == [stop - start for _, start, stop in items]
        # Column 0 holds the frame number: the crop starts where the sampler said.
        assert batch.inputs[:, 0, 0].tolist() == [float(start % 1000) for _, start, _ in items]


def test_target_store_beside_the_input_is_used(tmp_path):
    write_store(tmp_path / "train", [8, 5], dim=4)
    targets = write_store(tmp_path / "train_target", [8, 5], dim=6, seed=9)
    assert default_target_path(tmp_path / "train") == tmp_path / "train_target"
    dataset = FeatureDataset(tmp_path / "train")
    assert dataset.has_targets and dataset.target_dim == 6 and dataset.input_dim == 4
    batch = collate_features([dataset[(0, 2, 8)], dataset[1]])
    assert batch.targets.shape == (2, 6, 6)
    np.testing.assert_array_equal(batch.targets[0].numpy(), targets[0][2:8])
    assert batch.targets.dtype == torch.float16


def test_mismatched_target_store_is_rejected(tmp_path):
    write_store(tmp_path / "train", [8, 5])
    write_store(tmp_path / "train_target", [8, 6])
    with pytest.raises(ValueError, match="lengths differ"):
        FeatureDataset(tmp_path / "train")


def test_several_stores_are_concatenated(tmp_path):
    write_store(tmp_path / "a", [3, 4], prefix="a")
    write_store(tmp_path / "b", [5], prefix="b")
    dataset = FeatureDataset([tmp_path / "a", tmp_path / "b"])
    assert dataset.ids == ["a000", "a001", "b000"] and dataset.lengths.tolist() == [3, 4, 5]
    assert dataset[2][1].shape == (5, 4)
