"""The fine-tuning model: the pretrained encoder (or none, for the log-mel baseline) and a
downstream head, trained jointly on a labelled task.

    features [B, T, D] --encoder--> hidden states 0..N [B, T', H] --head--> logits
        frame level:     [B, T, C]  (each step's logits repeated over its R frames)
        utterance level: [B, C]     (mean or attentive pooling over the valid steps)

Parameter names are `encoder.*` (exactly the pretrained model's, so `load_encoder_dir` reads the
encoder of a fine-tuned model as it reads a pretrained one) and `head.*`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mockingjay.finetune_config import FinetuneConfig
from mockingjay.model import MockingjayEncoder, ModelConfig, padding_mask


class ClassificationHead(nn.Module):
    """Layer choice (last or softmax-weighted sum), pooling (utterance tasks), dropout, and a
    linear or one-hidden-layer classifier."""

    def __init__(self, width: int, num_states: int, config: FinetuneConfig):
        super().__init__()
        head = config.head
        self.level = config.level
        self.layer_weights = (
            nn.Parameter(torch.zeros(num_states)) if head.layer == "weighted_sum" else None
        )
        self.attention = (
            nn.Linear(width, 1)
            if self.level == "utterance" and head.pooling == "attentive"
            else None
        )
        self.dropout = nn.Dropout(head.dropout)
        if head.kind == "linear":
            self.classifier = nn.Linear(width, config.num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(width, head.hidden_size),
                nn.ReLU(),
                nn.Dropout(head.dropout),
                nn.Linear(head.hidden_size, config.num_classes),
            )

    def combine(self, states: tuple[Tensor, ...]) -> Tensor:
        """One [B, T', H] representation: the last state, or the softmax-weighted sum of all."""
        if self.layer_weights is None:
            return states[-1]
        weights = torch.softmax(self.layer_weights, dim=0)
        return torch.einsum("l,lbth->bth", weights.to(states[0].dtype), torch.stack(states))

    def forward(self, states: tuple[Tensor, ...], step_lengths: Tensor) -> Tensor:
        hidden = self.combine(states)
        if self.level == "utterance":
            valid = padding_mask(step_lengths, hidden.size(1))
            if self.attention is None:
                weights = valid.to(hidden.dtype) / step_lengths.clamp_min(1)[:, None]
            else:
                scores = self.attention(hidden).squeeze(-1).masked_fill(~valid, float("-inf"))
                weights = torch.softmax(scores.float(), dim=1).to(hidden.dtype)
            hidden = torch.einsum("bt,bth->bh", weights, hidden)
        return self.classifier(self.dropout(hidden))

    def softmax_layer_weights(self) -> list[float] | None:
        if self.layer_weights is None:
            return None
        return torch.softmax(self.layer_weights.detach().float(), dim=0).tolist()


class MockingjayForClassification(nn.Module):
    """Encoder (absent for the `logmel` variant) + classification head."""

    def __init__(self, model_config: ModelConfig, config: FinetuneConfig):
        super().__init__()
        if config.encoder_dropout is not None:
            model_config = dataclasses.replace(
                model_config,
                hidden_dropout=config.encoder_dropout,
                attention_dropout=config.encoder_dropout,
            )
        self.model_config, self.config = model_config, config
        self.encoder = MockingjayEncoder(model_config) if config.has_encoder else None
        width = model_config.hidden_size if self.encoder is not None else model_config.input_dim
        states = model_config.num_layers + 1 if self.encoder is not None else 1
        self.head = ClassificationHead(width, states, config)
        if config.freeze_input_representation and self.encoder is not None:
            self.encoder.input_representation.requires_grad_(False)

    def forward(
        self, features: Tensor, lengths: Tensor | None = None, encoder_grad: bool = True
    ) -> Tensor:
        """Logits: `[B, T, C]` at the feature frame rate (frame tasks) or `[B, C]`.

        `encoder_grad=False` runs the encoder without building its graph (a frozen encoder: its
        parameters get no gradient, and the step costs a forward pass of it only).
        """
        frames = features.size(1)
        if self.encoder is None:
            states = (features,)
            step_lengths = (
                lengths
                if lengths is not None
                else torch.full((features.size(0),), frames, device=features.device)
            )
            rate = 1
        else:
            layers = None if self.head.layer_weights is not None else [len(self.encoder.layers)]
            with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
                output = self.encoder.extract_features(features, lengths, layers=layers)
            states, step_lengths = output.hidden_states, output.lengths
            rate = self.model_config.downsample_rate
        logits = self.head(states, step_lengths)
        if self.config.level == "frame" and rate > 1:  # each step stood for R frames
            logits = logits.repeat_interleave(rate, dim=1)[:, :frames]
        return logits
