"""Checks that need a CUDA device (run on the GPU box; the CPU test suite covers the rest).

python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mockingjay.model import MockingjayForMAM, ModelConfig  # noqa: E402


def small_config(**overrides) -> ModelConfig:
    values = dict(
        input_dim=12,
        target_dim=10,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=64,
        max_positions=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_cuda_padding_invariance_and_bf16_training_step():
    # On CUDA the attention runs through the cuDNN / flash / efficient kernels chosen by
    # attention_backend_context, not the math path the CPU tests exercise.
    torch.manual_seed(0)
    model = MockingjayForMAM(small_config(hidden_size=64, num_heads=2)).cuda().eval()
    short = torch.randn(1, 10, 12, device="cuda")
    batch = torch.randn(2, 37, 12, device="cuda") * 100
    batch[1, :10] = short[0]
    alone = model.encoder(short, torch.tensor([10], device="cuda")).hidden_states[-1]
    padded = model.encoder(batch, torch.tensor([37, 10], device="cuda")).hidden_states[-1]
    torch.testing.assert_close(padded[1, :10], alone[0], atol=1e-4, rtol=1e-4)
    model.train()
    lengths = torch.tensor([37, 10], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        predictions = model(batch, lengths)
    assert torch.isfinite(predictions.float()).all()
    predictions.float().abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA device")
    test_cuda_padding_invariance_and_bf16_training_step()
    print("gpu checks: OK")
