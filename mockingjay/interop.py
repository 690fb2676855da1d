"""Checkpoints of s3prl and of the original Mockingjay code, converted to and from our model.

Layouts (docs/design.md section 8), checked against s3prl/s3prl: s3prl/upstream/mockingjay/builder.py
(the loader: the entries and config keys it reads), model.py (module names, TransformerConfig),
s3prl/pretrain/mockingjay/pretrain_expert.py (what pretraining saves), and, from the same
repository's 2019 history, mockingjay/model.py and nn_mockingjay.py (the original code)::

    s3prl     {"Transformer": encoder, "SpecHead": head, "Upstream_Config": {"transformer": ...,
              "task": ..., "audio": ...}, "Config": runner config, "Optimizer", "Step", "Args"}
              (older s3prl files keep the upstream config under "Config" or "Settings"/"Config")
    original  {"Mockingjay": encoder, "SpecHead": head, "Settings": {"Config": {"mockingjay":
              ...}, "Paras": Namespace}, "Optimizer", "Global_step"}; LayerNorm may be gamma/beta

Their network is ours: post-LN BERT layers, TF-style LayerNorm (the formula of torch's, eps inside
the square root), exact-erf GELU, sinusoidal positions added after the input projection, and
padded keys masked additively with -10000 (exp(-10000) is 0 in float32, as our boolean mask).
Only the layout differs: we fuse query, key and value into one projection (their rows
concatenated). Frames are stacked alike (`view(B, T // R, R * D)`, frame-major); they drop a
partial last step, we zero-pad it, so whole steps agree. Current s3prl (upstream/mockingjay) has
no frame stacking (R = 1); the original code and s3prl's 2020 `transformer` loader read
`downsample_rate`. Pre-LN files (`pre_layer_norm: true`) are refused: we do not implement that
network. `share_layer: true` files are imported as N identical copies of the shared layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from .config import FieldError
from .interop_features import audio_from_features, features_from_audio
from .interop_weights import (
    HEAD_PAIRS,
    InteropError,
    from_foreign_state,
    modern_name,
    module_pairs,
    to_foreign_state,
)
from .masking import MaskConfig
from .model import ACTIVATIONS, MockingjayEncoder, MockingjayForMAM, ModelConfig
from .safe_load import load_untrusted

LAYOUTS = ("s3prl", "mockingjay")
# s3prl / original config key -> ModelConfig field (s3prl's TransformerConfig reads all but the last)
MODEL_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "activation",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "initializer_range": "initializer_range",
    "layer_norm_eps": "layer_norm_eps",
    "downsample_rate": "downsample_rate",
}
_INTS = {"hidden_size", "num_layers", "num_heads", "intermediate_size", "downsample_rate"}
# s3prl `task` / original `mockingjay` key -> MaskConfig field (a record of how it was pretrained)
MASK_FIELDS = {
    "mask_proportion": "mask_proportion",
    "mask_consecutive": "span_length",
    "mask_frequency": "freq_mask_proportion",
    "noise_proportion": "noise_prob",
}


# -- reading a foreign checkpoint ---------------------------------------------------------------


@dataclass
class Imported:
    """A converted checkpoint: our model, the config.json sections to store, and the report."""

    model: MockingjayForMAM | None
    layout: str
    sections: dict[str, Any] = field(default_factory=dict)  # config.json sections beside "model"
    unmapped: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    feature_differences: list[str] = field(default_factory=list)


def _find_config(checkpoint: Mapping[str, Any], layout: str) -> tuple[str, str, Mapping]:
    """(dotted path of the config, model section name, config) as s3prl's builder looks them up."""
    settings = checkpoint.get("Settings")
    candidates = [
        ("Upstream_Config", checkpoint.get("Upstream_Config")),
        ("Config", checkpoint.get("Config")),
        ("Settings.Config", settings.get("Config") if isinstance(settings, Mapping) else None),
    ]
    sections = ("transformer", "mockingjay") if layout == "s3prl" else ("mockingjay", "transformer")
    for path, config in candidates:
        for section in sections:
            if isinstance(config, Mapping) and isinstance(config.get(section), Mapping):
                return path, section, config
    raise InteropError(
        f"no model config: none of Upstream_Config, Config, Settings.Config has a "
        f"{' or '.join(repr(s) for s in sections)} section"
    )


def _typed(value: Any, ours: str, where: str) -> Any:
    try:
        if ours in _INTS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        return str(value) if ours == "activation" else float(value)
    except (TypeError, ValueError):
        raise InteropError(f"{where} = {value!r} is not a valid {ours}") from None


def _model_config(encoder, head, path, section, config, report: Imported) -> ModelConfig:
    values: dict[str, Any] = {}
    declared_input_dim = None
    for key, value in config[section].items():
        where = f"{path}.{section}.{key}"
        if key in MODEL_FIELDS:
            values[MODEL_FIELDS[key]] = _typed(value, MODEL_FIELDS[key], where)
        elif key == "pre_layer_norm" and value:
            raise InteropError(
                f"{where} is {value!r}: pre-LayerNorm Transformers are not supported "
                "(ours is post-LN, as the paper and s3prl's default); nothing was written"
            )
        elif key == "share_layer" and value:
            report.notes.append(
                f"{where} is true: the layers share weights in the source; imported as "
                "identical copies (same outputs; fine-tuning would untie them)"
            )
        elif key == "input_dim":
            declared_input_dim = value
        elif key not in ("pre_layer_norm", "share_layer") and key not in MASK_FIELDS:
            report.unmapped[where] = value
    if values.get("activation", "gelu") not in ACTIVATIONS:
        raise InteropError(
            f"{path}.{section}.hidden_act = {values['activation']!r} is not supported "
            f"(supported: {', '.join(sorted(ACTIVATIONS))}); nothing was written"
        )
    projection = encoder.get("input_representations.spec_transform.weight")
    if not isinstance(projection, Tensor) or projection.dim() != 2:
        raise InteropError("encoder: no input_representations.spec_transform.weight matrix")
    hidden, stacked = projection.shape
    rate = values.setdefault("downsample_rate", 1)
    if stacked % rate:
        raise InteropError(
            f"{path}.{section}.downsample_rate = {rate} does not divide the input projection's "
            f"{stacked} inputs"
        )
    input_dim = stacked // rate
    if declared_input_dim not in (None, -1, input_dim, stacked):
        raise InteropError(
            f"{path}.{section}.input_dim = {declared_input_dim!r}, but the weights take "
            f"{input_dim}-d frames (x R={rate})"
        )
    layers = {int(k.split(".")[2]) for k in encoder if k.startswith("encoder.layer.")}
    checks = [
        ("hidden_size", "hidden_size", hidden),
        ("num_layers", "num_hidden_layers", len(layers)),
    ]
    ffn = encoder.get("encoder.layer.0.intermediate.dense.weight")
    if isinstance(ffn, Tensor) and ffn.dim() == 2:
        checks.append(("intermediate_size", "intermediate_size", ffn.shape[0]))
    for ours, theirs, actual in checks:
        if values.setdefault(ours, actual) != actual:
            raise InteropError(
                f"{path}.{section}.{theirs} = {values[ours]}, but the weights have {actual}"
            )
    target_dim = input_dim
    if head is not None:
        rows = head.get("output.weight")
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] % rate:
            raise InteropError(
                f"SpecHead.output.weight: expected [R x target_dim, hidden] with R={rate}"
            )
        target_dim = rows.shape[0] // rate
    try:
        return ModelConfig(input_dim=input_dim, target_dim=target_dim, **values)
    except ValueError as err:  # a field is named as the imported config names it, where it has it
        source = {ours: theirs for theirs, ours in MODEL_FIELDS.items()}
        theirs = source.get(err.field) if isinstance(err, FieldError) else None
        message = err.named(f"{path}.{section}", theirs) if theirs else str(err)
        raise InteropError(f"unsupported model config: {message}") from None


def _mask_section(path, section, config, report: Imported) -> dict | None:
    """MaskConfig from the `task` (s3prl) or model section (original) keys, for the record."""
    mapped: dict[str, Any] = {}
    for name in (section, "task"):
        values = config.get(name)
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            where = f"{path}.{name}.{key}"
            if key in MASK_FIELDS:
                mapped[MASK_FIELDS[key]] = value
            elif (
                name == "task"
                and key == "position_encoding_size"
                and value == config[section].get("hidden_size")
            ):
                continue  # "should be identical to hidden_size": it is
            elif name == "task" and key not in ("mask_consecutive_min", "mask_consecutive_max"):
                report.unmapped[where] = value
        if name == "task" and "mask_consecutive_min" in values:
            low, high = values["mask_consecutive_min"], values.get("mask_consecutive_max")
            if low == high:
                mapped["span_length"] = low
            else:
                report.unmapped[f"{path}.task.mask_consecutive_min/max"] = [low, high]
                report.notes.append("span lengths drawn from a range are not a MaskConfig setting")
    if not mapped:
        return None
    try:
        return MaskConfig.from_dict({**MaskConfig().to_dict(), **mapped}).to_dict()
    except (TypeError, ValueError) as err:
        report.notes.append(f"masking settings not recorded ({err})")
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return repr(value)


def convert_checkpoint(checkpoint: Any, source: str = "checkpoint") -> Imported:
    """Our model and config sections from a loaded s3prl / original-Mockingjay checkpoint dict."""
    if not isinstance(checkpoint, Mapping):
        raise InteropError(f"{source}: expected a dict of entries, got {type(checkpoint).__name__}")
    if isinstance(checkpoint.get("Transformer"), Mapping):
        layout, encoder_key = "s3prl", "Transformer"
    elif isinstance(checkpoint.get("Mockingjay"), Mapping):
        layout, encoder_key = "mockingjay", "Mockingjay"
    else:
        raise InteropError(
            f"{source}: not an s3prl or Mockingjay checkpoint: it has {sorted(map(str, checkpoint))}, "
            "expected a 'Transformer' (s3prl) or 'Mockingjay' (original code) state dict"
        )
    try:
        path, section, config = _find_config(checkpoint, layout)
    except InteropError as err:
        raise InteropError(f"{source}: {err}") from None
    encoder = {modern_name(k): v for k, v in checkpoint[encoder_key].items()}
    head = checkpoint.get("SpecHead")
    head = {modern_name(k): v for k, v in head.items()} if isinstance(head, Mapping) else None
    report = Imported(model=None, layout=layout)
    try:
        model_config = _model_config(encoder, head, path, section, config, report)
    except InteropError as err:
        raise InteropError(f"{source}: {err}") from None
    model = MockingjayForMAM(model_config)
    model.encoder.load_state_dict(
        from_foreign_state(
            encoder,
            module_pairs(model_config.num_layers),
            model.encoder.state_dict(),
            f"{source}: {encoder_key}",
        )
    )
    if head is not None:
        model.head.load_state_dict(
            from_foreign_state(head, HEAD_PAIRS, model.head.state_dict(), f"{source}: SpecHead")
        )
    else:
        report.notes.append(
            "no SpecHead: the prediction head is freshly initialised (the encoder is complete)"
        )
    report.model = model.eval()
    mask = _mask_section(path, section, config, report)
    if "audio" in config:
        mapping = features_from_audio(config["audio"], f"{path}.audio")
        report.unmapped.update(mapping.unmapped)
        report.feature_differences = mapping.differences
        features = mapping.features
    else:
        features = None
    if features is None:
        report.notes.append(
            "the file records no feature settings we can reproduce: featurize as the model was "
            "trained (s3prl: 80 log-mel, 25 ms / 10 ms, per-utterance CMVN is common; the "
            "original Mockingjay: 160-d log-mel + delta, 50 ms / 12.5 ms, featurize preset "
            "'paper'); probe and extract then warn but cannot check it"
        )
    used = {encoder_key, "SpecHead", path.split(".")[0], "Step", "Global_step"}
    report.ignored = sorted(str(k) for k in checkpoint if k not in used)
    report.ignored += [f"{path}.{k}" for k in config if k not in (section, "task", "audio")]
    if path.startswith("Settings"):
        report.ignored += [f"Settings.{k}" for k in checkpoint["Settings"] if k != "Config"]
    step = checkpoint.get("Step", checkpoint.get("Global_step"))
    report.sections = {
        **({"features": features} if features else {}),
        **({"mask": mask} if mask else {}),
        "import": {
            "source": source,
            "layout": layout,
            "config_path": f"{path}.{section}",
            "step": _jsonable(step),
            "unmapped": _jsonable(report.unmapped),
            "ignored": report.ignored,
            "notes": report.notes,
            "feature_differences": report.feature_differences,
            "source_config": _jsonable(config),
        },
    }
    return report


def import_checkpoint(path: str | Path) -> Imported:
    """Read (safely) and convert the checkpoint file at `path`."""
    return convert_checkpoint(load_untrusted(path), str(path))


# -- writing ours in their layout --------------------------------------------------------------


def export_checkpoint(
    model: MockingjayForMAM | MockingjayEncoder, stored: Mapping[str, Any], layout: str = "s3prl"
) -> tuple[dict, list[str]]:
    """(checkpoint dict for torch.save, notes) of our model in s3prl's or the original layout.

    `stored` is the model directory's config.json (features, mask, training sections are used
    when present). The dict holds only tensors and plain values: it loads with weights_only=True.
    """
    if layout not in LAYOUTS:
        raise InteropError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    config = model.config
    if layout == "s3prl" and config.downsample_rate != 1:
        raise InteropError(
            f"model.downsample_rate = {config.downsample_rate}: s3prl's upstream loader "
            "(s3prl/upstream/mockingjay) stacks no frames and would not load this input projection; "
            "export with --layout mockingjay (the original code reads downsample_rate)"
        )
    transformer = {theirs: getattr(config, ours) for theirs, ours in MODEL_FIELDS.items()}
    transformer.update(share_layer=False, pre_layer_norm=False, input_dim=config.input_dim)
    mask = MaskConfig.from_dict(stored["mask"]) if stored.get("mask") else MaskConfig()
    # A fine-tuned model's encoder comes alone: its head classifies, it does not reconstruct.
    prediction_head = getattr(model, "head", None)
    encoder_module = getattr(model, "encoder", model)
    encoder = to_foreign_state(encoder_module.state_dict(), module_pairs(config.num_layers))
    head = (
        to_foreign_state(prediction_head.state_dict(), HEAD_PAIRS)
        if prediction_head is not None
        else None
    )
    step = int((stored.get("training") or {}).get("total_steps", 0))
    audio, notes = audio_from_features(stored.get("features"))
    if head is None:
        notes = [*notes, "a fine-tuned encoder: no SpecHead (its prediction head was not kept)"]
    if layout == "mockingjay":
        transformer.pop("input_dim")
        transformer.update(mask_proportion=mask.mask_proportion, mask_consecutive=mask.span_length)
        # The original code reads only Config["mockingjay"]; "audio" (s3prl's layout) is for us.
        settings = {
            "Config": {"mockingjay": transformer, **({"audio": audio} if audio else {})},
            "Paras": {},
        }
        notes = [
            "the original code computes no features: feed it the features the model was trained on"
            + (" (recorded in s3prl's layout under Settings.Config.audio)" if audio else "")
        ] + [n for n in notes if n.startswith("a fine-tuned")]
        return {
            "Mockingjay": encoder,
            **({"SpecHead": head} if head is not None else {}),
            "Global_step": step,
            "Settings": settings,
        }, notes
    transformer.pop("downsample_rate")
    task = {
        "loss": "L1",
        "sequence_length": 0,
        "position_encoding_size": config.hidden_size,
        "mask_proportion": mask.mask_proportion,
        "mask_consecutive_min": mask.span_length,
        "mask_consecutive_max": mask.span_length,
        "mask_allow_overlap": True,
        "mask_bucket_ratio": 1.5,
        "mask_frequency": mask.freq_mask_proportion,
        "noise_proportion": mask.noise_prob,
    }
    upstream: dict[str, Any] = {
        "transformer": transformer,
        "task": task,
        **({"audio": audio} if audio else {}),
    }
    runner = {
        "exported_by": "mockingjay",
        **{k: _jsonable(stored[k]) for k in ("training", "mask") if k in stored},
    }
    return {
        "Transformer": encoder,
        **({"SpecHead": head} if head is not None else {}),
        "Upstream_Config": upstream,
        "Config": runner,
        "Step": step,
    }, notes
