"""Masked acoustic model (MAM) inputs and loss, computed on the batch's device.

Mockingjay (arXiv 1910.12638, section 2.2): pick ~15% of each utterance's steps in spans of C
consecutive steps; per utterance one roll decides 80% zero them, 10% replace them with other
frames of the same utterance, 10% leave them; L1 loss on every selected frame. TERA (arXiv
2007.06028) adds a frequency band zeroed per utterance (loss on those bins) and, per batch, a
Gaussian magnitude noise. A fresh mask is drawn every time a batch is seen (dynamic masking).

Everything is vectorised over the batch with tensor ops on the features' device: no loop over
utterances or frames and no host sync, so masking costs a few small kernels per step instead of
the 20-80 ms of CPU work per batch that caps s3prl's input pipeline.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# The settings live in a torch-free module (a parameter error is named without importing torch).
from mockingjay.mask_config import MASK_PRESETS, MaskConfig, mask_preset_config  # noqa: F401  (re-exported)

# Per-utterance policy codes in MaskedBatch.policy.
POLICY_ZERO, POLICY_RANDOM, POLICY_KEEP = 0, 1, 2


class MaskedBatch(NamedTuple):
    """Model inputs and what the loss looks at.

    The mask is kept factored: `time_mask` [B, T] (frames of the selected spans, whatever their
    policy) and `freq_mask` [B, D] (the TERA band, which applies to every valid frame). The
    element-wise loss mask is their union over valid frames, built on demand by `loss_mask` /
    `target_loss_mask`, so a [B, T, D] mask is only materialised where the loss needs it.
    """

    inputs: Tensor  # [B, T, D] altered features; padded frames untouched
    time_mask: Tensor  # [B, T] bool, selected frames (never padded)
    freq_mask: Tensor  # [B, D] bool, zeroed band (all False without TERA)
    valid_mask: Tensor  # [B, T] bool, frame < length
    policy: Tensor  # [B] long, POLICY_ZERO / POLICY_RANDOM / POLICY_KEEP
    num_masked_frames: Tensor  # [] long, time_mask.sum()

    @property
    def loss_mask(self) -> Tensor:
        """[B, T, D] bool: selected frames plus the band's bins on valid frames."""
        return self.time_mask[:, :, None] | (
            self.freq_mask[:, None, :] & self.valid_mask[:, :, None]
        )

    def target_loss_mask(self, target_dim: int) -> Tensor:
        """Loss mask for targets of `target_dim` dims: the full mask when targets are the input
        features, else `[B, T, 1]` selected frames (a mel band does not map onto, say, the
        paper LARGE's 1025 linear-spectrogram bins)."""
        if target_dim == self.freq_mask.size(1):
            return self.loss_mask
        return self.time_mask[:, :, None]


def _span_step_mask(
    step_lengths: Tensor, num_steps: int, config: MaskConfig, generator: torch.Generator | None
) -> Tensor:
    """[B, num_steps] bool: spans of C steps covering ~mask_proportion of each utterance.

    An utterance of L >= C steps gets k = clamp(round(p * L / C), 1, L // C) non-overlapping
    spans of exactly C steps, placed uniformly: choose k of the L - k(C - 1) "slots" and shift the
    j-th chosen slot by j(C - 1) (stars and bars). Span counts are exact and no span crosses the
    end. An utterance shorter than C (s3prl asserts and dies here, s3prl#342) gets one span
    starting uniformly in [0, L), clipped at its end.
    """
    batch, device, span = step_lengths.size(0), step_lengths.device, config.span_length
    lengths = step_lengths.long()
    holds_span = lengths >= span
    num_spans = torch.where(
        holds_span,
        torch.minimum(
            torch.round(lengths * (config.mask_proportion / span)).long().clamp_min(1),
            lengths // span,
        ),
        (lengths > 0).long(),
    )
    num_slots = torch.where(holds_span, lengths - num_spans * (span - 1), lengths)

    slot = torch.arange(num_steps, device=device)
    keys = torch.rand(batch, num_steps, device=device, generator=generator)
    keys = keys.masked_fill(slot >= num_slots[:, None], 2.0)  # unusable slots sort last
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = rank < num_spans[:, None]
    starts = slot + (chosen.long().cumsum(dim=1) - 1) * (span - 1)
    ends = torch.minimum(starts + span, lengths[:, None])
    # +1 at each start, -1 at each end, running sum > 0 inside spans; unchosen slots add 0.
    starts = torch.where(chosen, starts, num_steps)
    ends = torch.where(chosen, ends, num_steps)
    weight = chosen.long()
    delta = torch.zeros(batch, num_steps + 1, dtype=torch.long, device=device)
    delta.scatter_add_(1, starts, weight).scatter_add_(1, ends, -weight)
    return delta.cumsum(dim=1)[:, :num_steps] > 0


def mask_batch(
    features: Tensor,
    lengths: Tensor,
    config: MaskConfig,
    downsample_rate: int = 1,
    generator: torch.Generator | None = None,
) -> MaskedBatch:
    """Draw a fresh MAM mask for `features` [B, T, D] with `lengths` [B] valid frames.

    With R = downsample_rate > 1 spans are laid on steps of R frames (the model's time unit), so
    C spans cover C * R frames. `generator`, if given, must live on `features.device`.
    """
    batch, frames, dims = features.shape
    device = features.device
    lengths = lengths.to(device=device, dtype=torch.long).clamp(0, frames)
    frame_index = torch.arange(frames, device=device)
    valid = frame_index < lengths[:, None]

    r = downsample_rate
    num_steps = -(-frames // r)
    step_mask = _span_step_mask(
        torch.div(lengths + r - 1, r, rounding_mode="floor"), num_steps, config, generator
    )
    time_mask = step_mask if r == 1 else step_mask.repeat_interleave(r, dim=1)[:, :frames]
    time_mask = time_mask & valid

    # One roll per utterance picks what happens to all of its spans.
    roll = torch.rand(batch, device=device, generator=generator)
    policy = (roll >= config.zero_prob).long() + (
        roll >= config.zero_prob + config.random_prob
    ).long()
    # "Other frames of the same utterance": the utterance rotated by a random shift in
    # [1, L - 1], so replaced spans hold real, contiguous speech from elsewhere in it.
    span_frames = lengths.clamp_min(1)
    shift = 1 + (torch.rand(batch, device=device, generator=generator) * (span_frames - 1)).long()
    source = (frame_index + shift[:, None]) % span_frames[:, None]
    replaced = features.gather(1, source[:, :, None].expand(batch, frames, dims))
    inputs = torch.where(
        (time_mask & (policy == POLICY_RANDOM)[:, None])[:, :, None], replaced, features
    )
    inputs = inputs.masked_fill((time_mask & (policy == POLICY_ZERO)[:, None])[:, :, None], 0)

    band_limit = int(config.freq_mask_proportion * dims)
    if band_limit > 0:  # TERA frequency alteration: one band per utterance, width U{0..limit}
        width = (torch.rand(batch, device=device, generator=generator) * (band_limit + 1)).long()
        start = (torch.rand(batch, device=device, generator=generator) * (dims - width + 1)).long()
        bins = torch.arange(dims, device=device)
        freq_mask = (bins >= start[:, None]) & (bins < (start + width)[:, None])
        inputs = inputs.masked_fill(freq_mask[:, None, :] & valid[:, :, None], 0)
    else:
        freq_mask = torch.zeros(batch, dims, dtype=torch.bool, device=device)

    if config.noise_prob > 0:  # TERA magnitude alteration, one roll for the whole batch
        apply = torch.rand((), device=device, generator=generator) < config.noise_prob
        noise = (
            torch.randn(features.shape, device=device, generator=generator, dtype=features.dtype)
            * config.noise_std
        )
        inputs = inputs + noise * (valid[:, :, None] & apply).to(features.dtype)

    return MaskedBatch(inputs, time_mask, freq_mask, valid, policy, time_mask.sum())


def mam_l1_loss(predictions: Tensor, targets: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean L1 over masked elements -> (loss, number of masked elements).

    predictions [B, T_p, D] with T_p >= T (the model pads to whole steps; the extra frames are
    dropped), targets [B, T, D], loss_mask bool broadcastable to targets ([B, T, D] or [B, T, 1]).
    Computed in fp32. With nothing masked the loss is 0, finite and still attached to the graph;
    the denominator is clamped on the device rather than checked on the host.
    """
    predictions = predictions[:, : targets.size(1)]
    error = (predictions.float() - targets.float()).abs()
    error = torch.where(loss_mask, error, 0.0)  # where, not *: ignores inf/NaN outside the mask
    count = loss_mask.expand(targets.shape).sum()
    return error.sum() / count.clamp_min(1), count
