"""Tests for mockingjay.masking: span statistics, policies, TERA alterations, padding, loss."""

import pytest
import torch

from mockingjay.masking import (
    MASK_PRESETS,
    POLICY_KEEP,
    POLICY_RANDOM,
    POLICY_ZERO,
    MaskConfig,
    mam_l1_loss,
    mask_batch,
    mask_preset_config,
)
from mockingjay.model import PRESETS

PAPER = MaskConfig()
TERA = mask_preset_config("tera-base")


def make_batch(lengths, frames=None, dims=8, seed=0):
    lengths = torch.as_tensor(lengths)
    frames = frames or int(lengths.max())
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), frames, dims, generator=g) + 3.0  # no exact zeros
    return features, lengths


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def runs(row):
    """(start, length) of each run of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten()
    ends = (edges == -1).nonzero().flatten()
    return list(zip(starts.tolist(), (ends - starts).tolist()))


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "field,value",
    [
        ("mask_proportion", 0.0),
        ("mask_proportion", 1.0),
        ("span_length", 0),
        ("span_length", 2.5),
        ("zero_prob", 1.5),
        ("random_prob", -0.1),
        ("freq_mask_proportion", 1.0),
        ("noise_prob", 2.0),
        ("noise_std", -1.0),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MaskConfig(**{field: value})


def test_policy_probabilities_must_sum_to_at_most_one():
    with pytest.raises(ValueError, match="zero_prob \\+ random_prob"):
        MaskConfig(zero_prob=0.8, random_prob=0.3)
    assert MaskConfig(zero_prob=0.5, random_prob=0.5).keep_prob == 0.0


def test_presets_pair_with_the_model_presets_and_mask_as_their_method_does():
    assert set(MASK_PRESETS) == set(PRESETS)  # pretrain picks both halves with one name
    features, lengths = make_batch([90] * 32, dims=20)
    # TERA alters frequency bands; the paper's masking does not
    tera = mask_batch(features, lengths, MASK_PRESETS["tera-base"], generator=seeded(3))
    paper = mask_batch(features, lengths, MASK_PRESETS["paper-base"], generator=seeded(3))
    assert tera.freq_mask.any() and not paper.freq_mask.any()
    assert all(size % 7 == 0 for row in paper.time_mask for _, size in runs(row))
    # paper-large: spans of C = 3 steps of R = 3 frames, so masked runs come in 9 frames
    large = mask_batch(
        features, lengths, MASK_PRESETS["paper-large"], downsample_rate=3, generator=seeded(4)
    )
    sizes = [size for row in large.time_mask for _, size in runs(row)]
    assert sizes and all(size % 9 == 0 for size in sizes) and 9 in sizes
    assert mask_preset_config("paper-base", span_length=3).span_length == 3
    with pytest.raises(ValueError, match="valid presets"):
        mask_preset_config("bert")
    with pytest.raises(ValueError, match="unknown MaskConfig keys"):
        mask_preset_config("paper-base", spans=3)


# ------------------------------------------------------------------ spans


def test_masked_proportion_and_span_counts():
    lengths = torch.randint(100, 1500, (400,), generator=seeded(1))
    features, lengths = make_batch(lengths, dims=2)
    masked = mask_batch(features, lengths, PAPER, generator=seeded(2))
    per_utt = masked.time_mask.sum(1)
    expected_spans = torch.round(lengths * 0.15 / 7).long().clamp(1, None)
    assert torch.equal(per_utt, expected_spans * 7)  # exact: whole, non-overlapping spans
    proportion = per_utt.sum() / lengths.sum()
    assert abs(proportion.item() - 0.15) < 0.005
    assert masked.num_masked_frames.item() == per_utt.sum().item()
    for row, length in zip(masked.time_mask[:50], lengths[:50]):
        for start, size in runs(row):  # adjacent spans merge into multiples of C
            assert size % 7 == 0 and start + size <= length


def test_span_placement_is_spread_over_the_utterance():
    features, lengths = make_batch([200] * 2000, dims=1)
    coverage = mask_batch(features, lengths, PAPER, generator=seeded(3)).time_mask.float().mean(0)
    # Spans never cross the ends, so coverage ramps up over the first and last C frames; every
    # frame can still be selected, and the interior is covered uniformly at ~15%.
    assert coverage.min() > 0
    assert coverage[7:-7].min() > 0.12 and coverage[7:-7].max() < 0.18


@pytest.mark.parametrize("rate", [2, 3])
def test_spans_cover_whole_steps_when_downsampled(rate):
    lengths = torch.tensor([300, 299, 151, 40])
    features, _ = make_batch(lengths)
    masked = mask_batch(
        features, lengths, MaskConfig(span_length=3), downsample_rate=rate, generator=seeded(4)
    )
    for row, length in zip(masked.time_mask, lengths.tolist()):
        steps = -(-length // rate)
        spans = round(0.15 * steps / 3) or 1
        for start, size in runs(row):
            assert start % rate == 0
            assert size % (3 * rate) == 0 or start + size == length  # tail step may be partial
        assert row.sum() <= spans * 3 * rate and row[length:].sum() == 0


@pytest.mark.parametrize("length", range(1, 9))
def test_short_utterances_get_a_clipped_span_and_never_crash(length):
    features, lengths = make_batch([length, 30], frames=30)
    for seed in range(20):
        masked = mask_batch(features, lengths, TERA, generator=seeded(seed))
        row = masked.time_mask[0]
        assert 1 <= row.sum() <= min(length, 7)
        ((start, size),) = runs(row)  # exactly one span
        assert start + size == length or size == 7
        assert not masked.loss_mask[0, length:].any()


def test_all_short_batch_still_gives_finite_loss_and_gradients():
    features, lengths = make_batch([1, 2, 3, 5], frames=6)
    masked = mask_batch(features, lengths, TERA, downsample_rate=3, generator=seeded(5))
    predictions = torch.zeros_like(features, requires_grad=True)
    loss, count = mam_l1_loss(predictions, features, masked.loss_mask)
    assert torch.isfinite(loss) and count > 0
    loss.backward()
    assert torch.isfinite(predictions.grad).all()


def test_zero_length_rows_mask_nothing():
    features, lengths = make_batch([0, 10], frames=10)
    masked = mask_batch(features, lengths, TERA, generator=seeded(6))
    assert not masked.loss_mask[0].any() and torch.equal(masked.inputs[0], features[0])


# ------------------------------------------------------------------ policies and alterations


def test_policy_frequencies():
    features, lengths = make_batch([8] * 20000, dims=1)
    policy = mask_batch(features, lengths, PAPER, generator=seeded(7)).policy
    shares = torch.bincount(policy, minlength=3).float() / len(policy)
    torch.testing.assert_close(shares, torch.tensor([0.8, 0.1, 0.1]), atol=0.015, rtol=0)


def test_policies_alter_only_selected_frames():
    features, lengths = make_batch(torch.randint(30, 120, (300,), generator=seeded(8)), frames=130)
    masked = mask_batch(features, lengths, PAPER, generator=seeded(9))
    sel = masked.time_mask
    # Frames not selected (and all padding) are untouched.
    assert torch.equal(masked.inputs[~sel], features[~sel])
    for b in range(len(lengths)):
        rows = sel[b]
        if masked.policy[b] == POLICY_ZERO:
            assert torch.all(masked.inputs[b, rows] == 0)
        elif masked.policy[b] == POLICY_KEEP:
            assert torch.equal(masked.inputs[b], features[b])
        else:
            assert masked.policy[b] == POLICY_RANDOM
            replaced = masked.inputs[b, rows]
            valid = features[b, : lengths[b]]
            # every replacement is a real frame of the same utterance, not the original
            assert (replaced[:, None] == valid[None]).all(-1).any(1).all()
            assert not torch.equal(replaced, features[b, rows])
    assert {POLICY_ZERO, POLICY_RANDOM, POLICY_KEEP} <= set(masked.policy.tolist())


def test_tera_frequency_band():
    features, lengths = make_batch(
        torch.randint(20, 40, (1000,), generator=seeded(10)), frames=40, dims=80
    )
    config = MaskConfig(freq_mask_proportion=0.2, zero_prob=0.0, random_prob=0.0)  # keep spans
    masked = mask_batch(features, lengths, config, generator=seeded(11))
    widths = masked.freq_mask.sum(1)
    assert widths.min() == 0 and widths.max() == 16
    assert abs(widths.float().mean().item() - 8.0) < 0.5  # U{0..16}
    for b in range(20):
        if widths[b]:
            ((start, size),) = runs(masked.freq_mask[b])
            assert size == widths[b]
    band_on_valid = masked.freq_mask[:, None, :] & masked.valid_mask[:, :, None]
    assert torch.all(masked.inputs[band_on_valid] == 0)
    assert torch.equal(masked.inputs[~band_on_valid], features[~band_on_valid])
    assert torch.equal(masked.loss_mask, band_on_valid | masked.time_mask[:, :, None])
    assert torch.equal(masked.target_loss_mask(80), masked.loss_mask)
    assert masked.target_loss_mask(1025).shape == (1000, 40, 1)


def test_tera_noise_is_per_batch_and_spares_padding():
    features, lengths = make_batch([10, 4], frames=10)
    always = MaskConfig(noise_prob=1.0, zero_prob=0.0, random_prob=0.0)
    masked = mask_batch(features, lengths, always, generator=seeded(12))
    valid = masked.valid_mask
    assert torch.all(masked.inputs[valid] != features[valid])
    assert torch.equal(masked.inputs[~valid], features[~valid])
    assert abs((masked.inputs[valid] - features[valid]).std().item() - 0.2) < 0.05
    g = seeded(13)
    noisy = [
        not torch.equal(
            mask_batch(
                features,
                lengths,
                MaskConfig(noise_prob=0.15, zero_prob=0, random_prob=0),
                generator=g,
            ).inputs,
            features,
        )
        for _ in range(600)
    ]
    assert abs(sum(noisy) / 600 - 0.15) < 0.05


def test_padding_is_never_masked_or_altered():
    features, lengths = make_batch(torch.randint(1, 50, (500,), generator=seeded(14)), frames=50)
    for rate in (1, 3):
        masked = mask_batch(
            features,
            lengths,
            TERA.__class__(**{**TERA.to_dict(), "noise_prob": 1.0}),
            downsample_rate=rate,
            generator=seeded(15),
        )
        pad = ~masked.valid_mask
        assert not masked.time_mask[pad].any() and not masked.loss_mask[pad].any()
        assert torch.equal(masked.inputs[pad], features[pad])


def test_reproducible_with_a_generator():
    features, lengths = make_batch([100, 80, 5])
    a = mask_batch(features, lengths, TERA, generator=seeded(1))
    b = mask_batch(features, lengths, TERA, generator=seeded(1))
    c = mask_batch(features, lengths, TERA, generator=seeded(2))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.time_mask, c.time_mask)


# ------------------------------------------------------------------ loss


def test_loss_is_the_mean_over_masked_elements_only():
    features, lengths = make_batch([12, 7], frames=12, dims=4)
    masked = mask_batch(features, lengths, TERA, generator=seeded(16))
    predictions = torch.randn(2, 15, 4)  # longer: padded to whole steps, cropped by the loss
    loss, count = mam_l1_loss(predictions, features, masked.loss_mask)
    mask = masked.loss_mask
    expected = (predictions[:, :12] - features).abs()[mask].mean()
    torch.testing.assert_close(loss, expected)
    assert count == mask.sum()
    perturbed = predictions.clone()
    perturbed[:, :12][~mask] = float("inf")  # unmasked elements cannot reach the loss
    torch.testing.assert_close(mam_l1_loss(perturbed, features, mask)[0], expected)


def test_frame_mask_broadcasts_over_target_dims():
    predictions, targets = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    frame_mask = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)[:, :, None]
    loss, count = mam_l1_loss(predictions, targets, frame_mask)
    assert count == 9
    torch.testing.assert_close(
        loss, (predictions - targets).abs()[frame_mask.expand(2, 5, 3)].mean()
    )


def test_empty_mask_gives_zero_loss_that_still_backpropagates():
    predictions = torch.randn(2, 5, 3, requires_grad=True)
    loss, count = mam_l1_loss(
        predictions, torch.randn(2, 5, 3), torch.zeros(2, 5, 3, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and count.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(predictions.grad, torch.zeros_like(predictions))


def test_masking_compiles_without_graph_breaks():
    # No host sync or data-dependent branch: dynamo captures it whole. (A torch.Generator cannot
    # be traced, so the compiled path draws from the global RNG.)
    torch.manual_seed(0)  # the global RNG's state otherwise depends on which tests ran before
    features, lengths = make_batch([40, 17, 3], frames=40)
    compiled = torch.compile(mask_batch, backend="aot_eager", fullgraph=True)
    masked = compiled(features, lengths, TERA, 3)
    # 40 frames = 14 steps of 3, the last holding one frame: one span of 7 steps is 21 frames, or
    # 19 when it ends on that last step. 3 frames = one step, wholly selected.
    frames = masked.time_mask[0].nonzero().flatten()
    assert int(frames[-1] - frames[0]) + 1 == len(frames)  # one contiguous span
    assert len(frames) == 21 or (len(frames) == 19 and int(frames[-1]) == 39), frames.tolist()
    assert masked.time_mask[2].sum() == 3
    assert not masked.loss_mask[~masked.valid_mask].any()
    assert masked.num_masked_frames == masked.time_mask.sum()
