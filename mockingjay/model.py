"""The Mockingjay model: a post-LayerNorm Transformer encoder over acoustic frames.

Read top-down: configuration and presets, padding masks, input representation, attention, feed
forward, encoder layer, encoder, prediction head, and the pretraining wrapper. The method is
Liu et al. 2020 (arXiv 1910.12638), section 2; TERA (arXiv 2007.06028) only changes the inputs.

Lengths are always passed explicitly (frames per utterance, `[B]` long) and every padding mask is
built from them: padding is never inferred from all-zero rows, which breaks once features are
normalised or noised (s3prl#346).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The settings live in a torch-free module (a parameter error is named without importing torch).
from mockingjay.model_config import (  # noqa: F401  (re-exported)
    ACTIVATION_NAMES,
    DEFAULT_PRESET,
    PRESETS,
    ModelConfig,
    preset_config,
)

# --------------------------------------------------------------------------------------------
# Configuration: ModelConfig and the presets live in mockingjay/model_config.py (torch-free).

# The non-linearities s3prl's `hidden_act` names (BERT's ACT2FN); gelu is the exact erf form.
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


# --------------------------------------------------------------------------------------------
# Padding masks and lengths


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """`[B, max_len]` bool, True on real positions. No host sync: `max_len` is a shape."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def downsampled_lengths(lengths: Tensor, downsample_rate: int) -> Tensor:
    """Steps per utterance after stacking R frames: ceil(frames / R), at least 1."""
    return torch.div(
        lengths.clamp_min(1) + downsample_rate - 1, downsample_rate, rounding_mode="floor"
    )


def upsample_to_frames(hidden: Tensor, downsample_rate: int, num_frames: int) -> Tensor:
    """Align step-rate hidden states `[B, T', H]` to the feature frame rate `[B, num_frames, H]`.

    Each step stood for R consecutive frames, so it is repeated R times and the padded tail is
    cropped; frame labels (phones at the feature hop) then line up one-to-one. Hidden states are
    repeated rather than reshaped: only the prediction head's R*target output splits into frames.
    """
    if num_frames > hidden.size(1) * downsample_rate:
        raise ValueError(
            f"num_frames={num_frames} exceeds {hidden.size(1)} steps x R={downsample_rate}"
        )
    if downsample_rate == 1:
        return hidden[:, :num_frames]
    return hidden.repeat_interleave(downsample_rate, dim=1)[:, :num_frames]


def sinusoid_table(num_positions: int, hidden_size: int) -> Tensor:
    """Transformer position encoding: sin on even dims, cos on odd (Vaswani et al. 2017)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(
        10000.0, -torch.arange(0, hidden_size, 2, dtype=torch.float64) / hidden_size
    )
    table = torch.zeros(num_positions, hidden_size, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: hidden_size // 2])
    return table.float()


# Attention backends in order of preference on CUDA. Measured on an H200, torch 2.11, BASE B32
# T1500 bf16 training step: with a boolean padding mask cuDNN is fastest (flash cannot take a
# mask and the default then picks the memory-efficient kernel, ~40% slower in attention, docs/design.md
# section 7); without a mask cuDNN still beat flash (32.6 vs 33.9 ms eager, 26.9 vs 28.0 ms
# compiled). Math stays last so the CPU and odd shapes always have a path. Keyed by "is there a
# padding mask", so the two cases can be tuned apart (set_attention_priority).
_MEASURED_ORDER = (
    "CUDNN_ATTENTION",
    "FLASH_ATTENTION",
    "EFFICIENT_ATTENTION",
    "MATH",
)  # best for both today
SDPA_PRIORITY: dict[bool, tuple[str, ...]] = {True: _MEASURED_ORDER, False: _MEASURED_ORDER}

try:  # torch >= 2.6 honours the list's order; older versions would only restrict to it.
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel

    _SDPA_SET_PRIORITY = "set_priority" in inspect.signature(_sdpa_kernel).parameters
except ImportError:  # pragma: no cover - torch < 2.3
    _sdpa_kernel, _SDPA_SET_PRIORITY = None, False
_SDPA_BACKENDS: dict[bool, list] = {}


def set_attention_priority(
    masked: Sequence[str] | None = None, unmasked: Sequence[str] | None = None
) -> None:
    """Replace the SDPA backend preference (SDPBackend names) with / without a padding mask."""
    for key, order in ((True, masked), (False, unmasked)):
        if order is not None:
            SDPA_PRIORITY[key] = tuple(order)
        if _SDPA_SET_PRIORITY:
            _SDPA_BACKENDS[key] = [
                getattr(SDPBackend, name)
                for name in SDPA_PRIORITY[key]
                if hasattr(SDPBackend, name)
            ]


set_attention_priority()


def attention_backend_context(masked: bool = True):
    """Context that makes scaled_dot_product_attention try backends in SDPA_PRIORITY order."""
    if not _SDPA_SET_PRIORITY:
        return contextlib.nullcontext()
    return _sdpa_kernel(_SDPA_BACKENDS[masked], set_priority=True)


# --------------------------------------------------------------------------------------------
# Layers


class InputRepresentation(nn.Module):
    """Stack R frames into one step, project to H, add sinusoidal positions, LayerNorm, dropout.

    Positions are added after the projection: added to raw acoustic features they swamp them
    (paper section 2.1). Frames beyond each length are zeroed first so that whatever the collate
    put in the padding cannot leak into a partially filled last step.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.downsample_rate = config.downsample_rate
        self.projection = nn.Linear(config.input_dim * config.downsample_rate, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.register_buffer(
            "position_table",
            sinusoid_table(config.max_positions, config.hidden_size),
            persistent=False,
        )

    def positions(self, num_steps: int) -> Tensor:
        if num_steps > self.position_table.size(0):  # rare: grow once, then reuse
            self.position_table = sinusoid_table(2 * num_steps, self.position_table.size(1)).to(
                self.position_table.device
            )
        return self.position_table[:num_steps]

    def forward(self, features: Tensor, lengths: Tensor | None) -> Tensor:
        batch, frames, dims = features.shape
        if lengths is not None:
            features = features * padding_mask(lengths, frames)[..., None].to(features.dtype)
        r = self.downsample_rate
        tail = (-frames) % r
        if tail:
            features = F.pad(features, (0, 0, 0, tail))
        steps = features.reshape(batch, (frames + tail) // r, r * dims)
        hidden = self.projection(steps) + self.positions(steps.size(1))
        return self.dropout(self.layer_norm(hidden))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection over torch's SDPA kernels."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor, key_mask: Tensor | None) -> Tensor:
        batch, steps, width = hidden.shape
        qkv = self.qkv(hidden).view(batch, steps, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        # key_mask [B, 1, 1, T]: padded keys get no weight; padded queries still see real keys,
        # so no row is ever fully masked (every utterance has >= 1 step) and nothing turns NaN.
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=key_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.output(attended.transpose(1, 2).reshape(batch, steps, width))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.activation]  # default exact (erf) GELU, as BERT

    def forward(self, hidden: Tensor) -> Tensor:
        return self.down(self.activation(self.up(hidden)))


class EncoderLayer(nn.Module):
    """BERT layer, post-LN: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: Tensor, key_mask: Tensor | None) -> Tensor:
        hidden = self.attention_norm(hidden + self.dropout(self.attention(hidden, key_mask)))
        return self.output_norm(hidden + self.dropout(self.feed_forward(hidden)))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT init: normal(0, std) weights, zero biases, LayerNorm at identity."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Encoder


class EncoderOutput(NamedTuple):
    """hidden_states[0] is the input representation, hidden_states[i] the output of layer i
    (each `[B, T', H]`, T' = ceil(T / R) steps); lengths are valid steps per utterance."""

    hidden_states: tuple[Tensor, ...]
    lengths: Tensor


class MockingjayEncoder(nn.Module):
    """The upstream model kept after pretraining: input representation + N encoder layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.input_representation = InputRepresentation(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        """features `[B, T, input_dim]`, lengths `[B]` frames -> all N+1 hidden states.

        `lengths=None` means every utterance fills all T frames: no attention mask is built and
        the unmasked kernels run. Decide that where lengths are still on the host (the collate),
        never by inspecting device tensors here (a host sync per step).
        """
        return self.extract_features(features, lengths)

    def extract_features(
        self, features: Tensor, lengths: Tensor | None = None, layers: Sequence[int] | None = None
    ) -> EncoderOutput:
        """Hidden states of `layers` (indices 0..N, in the order given; default all N+1).

        Stops after the deepest requested layer, so probing layer 1 of a 12-layer model costs one
        layer.
        """
        num_layers = len(self.layers)
        wanted = list(range(num_layers + 1)) if layers is None else [int(i) for i in layers]
        for index in wanted:
            if not 0 <= index <= num_layers:
                raise ValueError(f"layer index {index} out of range 0..{num_layers}")
        if features.dim() != 3 or features.size(-1) != self.config.input_dim:
            raise ValueError(
                f"features must be [B, T, {self.config.input_dim}], got {tuple(features.shape)}"
            )
        hidden = self.input_representation(features, lengths)
        steps = hidden.size(1)
        r = self.config.downsample_rate
        if lengths is None:
            step_lengths = torch.full(
                (hidden.size(0),), steps, device=hidden.device, dtype=torch.long
            )
            key_mask = None
        else:
            step_lengths = downsampled_lengths(lengths, r)
            key_mask = padding_mask(step_lengths, steps)[:, None, None, :]
        outputs = [hidden]
        with attention_backend_context(masked=key_mask is not None):
            for layer in self.layers[: max(wanted, default=0)]:
                hidden = layer(hidden, key_mask)
                outputs.append(hidden)
        return EncoderOutput(tuple(outputs[i] for i in wanted), step_lengths)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# Pretraining: prediction head and masked acoustic model


class PredictionHead(nn.Module):
    """dense(H, H) -> activation (GELU) -> LayerNorm -> Linear(H, R * target_dim), split into R frames."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.downsample_rate = config.downsample_rate
        self.target_dim = config.target_dim
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.downsample_rate * config.target_dim)
        self.activation = ACTIVATIONS[config.activation]
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, hidden: Tensor) -> Tensor:
        """`[B, T', H]` -> `[B, T' * R, target_dim]` at the feature frame rate."""
        batch, steps, _ = hidden.shape
        out = self.output(self.layer_norm(self.activation(self.dense(hidden))))
        return out.reshape(batch, steps * self.downsample_rate, self.target_dim)


class MockingjayForMAM(nn.Module):
    """Encoder + prediction head, trained to reconstruct masked frames (masked acoustic model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = MockingjayEncoder(config)
        self.head = PredictionHead(config)

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Predicted frames `[B, ceil(T / R) * R, target_dim]`; crop to T before the loss."""
        last = self.encoder.extract_features(
            features, lengths, layers=[self.config.num_layers]
        ).hidden_states[0]
        return self.head(last)

    def num_parameters(self, include_head: bool = True) -> int:
        module = self if include_head else self.encoder
        return sum(p.numel() for p in module.parameters())
