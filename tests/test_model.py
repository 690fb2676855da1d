"""Tests for mockingjay.model: configuration, shapes, padding invariance, checkpoints, compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from mockingjay.feature_config import FEATURE_PRESETS, FeatureConfig
from mockingjay.model import (
    PRESETS,
    EncoderOutput,
    MockingjayEncoder,
    MockingjayForMAM,
    ModelConfig,
    PredictionHead,
    downsampled_lengths,
    padding_mask,
    preset_config,
    sinusoid_table,
    upsample_to_frames,
)


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


# ------------------------------------------------------------------ configuration and presets


@pytest.mark.parametrize("name,expected", [("paper-base", 21.4e6), ("paper-large", 85.4e6)])
def test_paper_encoder_parameter_counts(name, expected):
    model = MockingjayForMAM(preset_config(name))
    encoder_params = model.num_parameters(include_head=False)
    assert encoder_params == model.encoder.num_parameters()
    assert abs(encoder_params - expected) / expected < 0.01
    assert model.num_parameters() > encoder_params  # the head is counted only on request


def test_presets_consume_what_their_feature_presets_produce():
    # Layer sizes are covered by the paper's parameter counts above; what else matters is that
    # a model preset fits the features it is trained on, input and reconstruction target alike.
    def features(name, **extra):
        return FeatureConfig(**{**FEATURE_PRESETS[name], **extra})

    trained_on = {
        "paper-base": features("paper"),
        "paper-large": features("paper", target="linear"),
        "tera-base": features("tera"),
        "s3prl-base": features("s3prl"),
    }
    assert set(trained_on) == set(PRESETS)
    for name, settings in trained_on.items():
        assert PRESETS[name].input_dim == settings.dim, name
    assert (
        PRESETS["paper-base"].target_dim == trained_on["paper-base"].n_mels
    )  # the mel half of mel + delta
    assert (
        PRESETS["paper-large"].target_dim == trained_on["paper-large"].target_dim
    )  # the linear spectrogram
    for name in ("tera-base", "s3prl-base"):
        assert PRESETS[name].target_dim == trained_on[name].target_dim
    # the defaults of featurize and pretrain fit each other
    assert preset_config().input_dim == FeatureConfig().dim


def test_preset_overrides_and_unknown_names():
    assert preset_config("paper-base", num_layers=1).num_layers == 1
    with pytest.raises(ValueError, match="paper-base.*paper-large.*s3prl-base.*tera-base"):
        preset_config("bert")
    with pytest.raises(ValueError, match="num_layer"):
        preset_config("paper-base", num_layer=2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 30),
        ("num_layers", 0),
        ("input_dim", -1),
        ("num_heads", 0),
        ("downsample_rate", 0),
        ("hidden_dropout", 1.0),
        ("attention_dropout", -0.1),
        ("layer_norm_eps", 0.0),
        ("intermediate_size", 2.5),
        ("max_positions", 0),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_config_dict_round_trip_rejects_unknown_and_missing_keys():
    config = small_config(downsample_rate=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*'hidden'"):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})
    values = config.to_dict()
    del values["input_dim"]
    with pytest.raises(ValueError, match="input_dim"):
        ModelConfig.from_dict(values)


def test_initialisation_is_bert_style():
    model = MockingjayForMAM(small_config(hidden_size=64, intermediate_size=256, num_heads=4))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.02) < 0.004, name
            assert torch.all(module.bias == 0), name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
            assert module.eps == 1e-12


# ------------------------------------------------------------------ shapes and helpers


@pytest.mark.parametrize("rate", [1, 3])
def test_encoder_returns_every_layer_and_step_lengths(rate):
    config = small_config(downsample_rate=rate)
    encoder = MockingjayEncoder(config).eval()
    lengths = torch.tensor([20, 7, 1])
    out = encoder(torch.randn(3, 20, 12), lengths)
    assert isinstance(out, EncoderOutput)
    assert len(out.hidden_states) == config.num_layers + 1
    steps = math.ceil(20 / rate)
    assert all(h.shape == (3, steps, 32) for h in out.hidden_states)
    assert out.lengths.tolist() == [math.ceil(n / rate) for n in lengths.tolist()]
    assert all(torch.isfinite(h).all() for h in out.hidden_states)  # padded rows too


def test_lengths_none_means_unpadded():
    encoder = MockingjayEncoder(small_config()).eval()
    x = torch.randn(2, 9, 12)
    with_lengths = encoder(x, torch.tensor([9, 9]))
    without = encoder(x)
    assert without.lengths.tolist() == [9, 9]
    for a, b in zip(with_lengths.hidden_states, without.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_extract_features_subset_order_and_early_stop():
    encoder = MockingjayEncoder(small_config()).eval()
    x, lengths = torch.randn(2, 10, 12), torch.tensor([10, 6])
    full = encoder(x, lengths).hidden_states
    calls = []
    for i, layer in enumerate(encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    subset = encoder.extract_features(x, lengths, layers=[1, 0])
    assert calls == [0]  # layers 2 and 3 never ran
    torch.testing.assert_close(subset.hidden_states[0], full[1])
    torch.testing.assert_close(subset.hidden_states[1], full[0])
    with pytest.raises(ValueError, match="out of range"):
        encoder.extract_features(x, lengths, layers=[4])
    with pytest.raises(ValueError, match="features must be"):
        encoder(torch.randn(2, 10, 11), lengths)


def test_helpers():
    assert padding_mask(torch.tensor([2, 0, 3]), 3).tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, True],
    ]
    assert downsampled_lengths(torch.tensor([1, 3, 4, 0]), 3).tolist() == [1, 1, 2, 1]
    hidden = torch.arange(6.0).view(1, 3, 2)
    frames = upsample_to_frames(hidden, 3, 8)
    assert frames.shape == (1, 8, 2)
    assert frames[0, :, 0].tolist() == [0, 0, 0, 2, 2, 2, 4, 4]
    assert upsample_to_frames(hidden, 1, 2).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="exceeds"):
        upsample_to_frames(hidden, 3, 10)
    table = sinusoid_table(5, 8)
    assert table[0, 0::2].abs().max() == 0 and torch.all(table[0, 1::2] == 1)
    torch.testing.assert_close(table[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))


def test_prediction_head_splits_steps_back_into_frames():
    config = small_config(downsample_rate=3)
    out = PredictionHead(config)(torch.randn(2, 5, 32))
    assert out.shape == (2, 15, 10)
    model = MockingjayForMAM(config)
    predictions = model(torch.randn(2, 14, 12), torch.tensor([14, 4]))
    assert predictions.shape == (2, 15, 10)  # ceil(14 / 3) * 3 frames; caller crops to 14
    predictions.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_matches_a_reference_with_key_padding():
    encoder = MockingjayEncoder(small_config()).eval()
    attention = encoder.layers[0].attention
    hidden, lengths = torch.randn(2, 7, 32), torch.tensor([7, 4])
    mask = padding_mask(lengths, 7)[:, None, None, :]
    q, k, v = attention.qkv(hidden).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attention.output((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attention(hidden, mask), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ padding never leaks


@pytest.mark.parametrize("rate", [1, 3])
def test_padding_does_not_change_real_frames(rate):
    torch.manual_seed(0)
    model = MockingjayForMAM(small_config(downsample_rate=rate)).eval()
    short = torch.randn(1, 10, 12)
    alone = model.encoder(short, torch.tensor([10]))
    batch = torch.randn(2, 23, 12) * 100  # garbage padding, including inside the last step
    batch[1, :10] = short[0]
    padded = model.encoder(batch, torch.tensor([23, 10]))
    steps = alone.lengths.item()
    assert padded.lengths.tolist() == [math.ceil(23 / rate), steps]
    for a, b in zip(alone.hidden_states, padded.hidden_states):
        torch.testing.assert_close(b[1, :steps], a[0, :steps], atol=1e-5, rtol=1e-5)
    frames = model(batch, torch.tensor([23, 10]))[1, :10]
    torch.testing.assert_close(
        frames, model(short, torch.tensor([10]))[0, :10], atol=1e-5, rtol=1e-5
    )


def test_dropout_only_in_training():
    model = MockingjayForMAM(small_config())
    x, lengths = torch.randn(2, 8, 12), torch.tensor([8, 5])
    model.train()
    assert not torch.allclose(model(x, lengths), model(x, lengths))
    model.eval()
    torch.testing.assert_close(model(x, lengths), model(x, lengths))


def test_position_table_grows_for_long_inputs_and_is_not_saved():
    encoder = MockingjayEncoder(small_config(max_positions=16)).eval()
    assert "input_representation.position_table" not in encoder.state_dict()
    out = encoder(torch.randn(1, 40, 12), torch.tensor([40]))
    assert out.hidden_states[-1].shape == (1, 40, 32)
    assert encoder.input_representation.position_table.size(0) >= 40
    torch.testing.assert_close(
        encoder.input_representation.position_table[:40], sinusoid_table(40, 32)
    )


# ------------------------------------------------------------------ checkpoints, precision, compile


def test_bf16_autocast_forward_backward():
    model = MockingjayForMAM(small_config())
    x, lengths = torch.randn(2, 8, 12), torch.tensor([8, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = model(x, lengths)
    assert torch.isfinite(predictions.float()).all()
    F.l1_loss(predictions.float()[:, :8], torch.randn(2, 8, 10)).backward()
    assert model.encoder.layers[0].attention.qkv.weight.grad is not None


def test_compiles_without_graph_breaks():
    # aot_eager traces exactly what inductor would (dynamo + autograd) without a C++ build, and
    # fullgraph=True fails on any graph break: data-dependent control flow or host syncs.
    model = MockingjayForMAM(small_config(downsample_rate=3))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, lengths = torch.randn(2, 14, 12), torch.tensor([14, 5])
    model.eval()
    torch.testing.assert_close(compiled(x, lengths), model(x, lengths), atol=1e-5, rtol=1e-5)
    model.train()
    compiled(x, lengths).sum().backward()
    assert model.head.output.weight.grad is not None
