"""Feature settings: s3prl's `audio` config section <-> our FeatureConfig (features.py).

s3prl computes features on the fly from one of two `audio` layouts (checked against s3prl/s3prl,
s3prl/upstream/baseline/preprocessor.py and extracter.py, and builder.py which picks one):

* torchaudio preprocessor (no `kaldi` key; OnlinePreprocessor(**audio)): `sample_rate` (16000),
  `win_ms` (25), `hop_ms` (10), `n_freq` (201; n_fft = 2 (n_freq - 1)), `n_mels` (40), `eps`
  (1e-10: inside the log and the CMVN), `target_level` (each waveform is first scaled to this
  dB level; builder.py requires it), and `input` / `target`: {feat_type, channel, log, delta,
  cmvn}. Its log-mel is ours: centred periodic-Hann STFT, power spectrum, HTK mel without norm,
  log(x + eps), compute_deltas (window 5) before per-utterance CMVN.
* Kaldi (`kaldi: {feat_type: fbank, fbank: {num_mel_bins, frame_length, frame_shift, ...}}`,
  `delta: {order, win_length}`, `cmvn: {use_cmvn}`): torchaudio.compliance.kaldi.fbank, which we
  do not compute (Povey window, pre-emphasis, DC removal, snip_edges framing, Kaldi mel banks).
  Mapped to the nearest log-mel settings, with the differences reported.

Imports return the FeatureConfig (as the dict the pretrain stage stores under "features" in
config.json), the source fields it could not use, and the known differences; exports write the
preprocessor layout, which the UpstreamExpert of s3prl/upstream/mockingjay/expert.py needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .feature_config import FEATURE_PRESETS, FeatureConfig

S3PRL_SAMPLE_RATE = (
    16_000  # extracter.py's SAMPLE_RATE; the UpstreamExpert assumes a 160-sample hop
)
S3PRL_TARGET_LEVEL = -25  # s3prl's configs; builder.py reads audio.target_level unconditionally
_PREPROCESSOR_KEYS = {
    "sample_rate",
    "win_ms",
    "hop_ms",
    "n_freq",
    "n_mels",
    "eps",
    "input",
    "target",
}
_FEAT_KEYS = {"feat_type", "channel", "log", "delta", "cmvn"}
_FBANK_KEYS = {"num_mel_bins", "frame_length", "frame_shift", "use_log_fbank"}


@dataclass
class FeatureMapping:
    """What an `audio` section says about the features, in our terms."""

    features: dict | None = None  # FeatureConfig.to_dict(), or None when they cannot be mapped
    unmapped: dict[str, Any] = field(default_factory=dict)  # "Upstream_Config.audio.x": value
    differences: list[str] = field(default_factory=list)  # known ways our features differ


def features_from_audio(audio: Mapping[str, Any], where: str) -> FeatureMapping:
    """Map an s3prl `audio` section (dotted path `where`) to our feature settings."""
    if not isinstance(audio, Mapping):
        return FeatureMapping(unmapped={where: audio}, differences=[f"{where} is not a mapping"])
    if "kaldi" in audio:
        return _from_kaldi(audio, where)
    return _from_preprocessor(audio, where)


def _feature_config(where: str, mapping: FeatureMapping, **values: Any) -> FeatureMapping:
    preset = next(
        (
            name
            for name, preset in FEATURE_PRESETS.items()
            if all(values.get(k) == v for k, v in preset.items())
        ),
        "custom",
    )
    try:
        config = FeatureConfig(preset=preset, **values)
        config.validate()
    except (TypeError, ValueError) as err:
        mapping.differences.append(f"{where}: these settings make no valid feature config ({err})")
        return mapping
    mapping.features = config.to_dict()
    return mapping


def _from_preprocessor(audio: Mapping[str, Any], where: str) -> FeatureMapping:
    mapping = FeatureMapping()
    source = audio.get("input", {})
    target = audio.get("target", source)
    for key, value in audio.items():
        if key not in _PREPROCESSOR_KEYS:
            mapping.unmapped[f"{where}.{key}"] = value
    for name, section in (("input", source), ("target", target)):
        for key, value in section.items() if isinstance(section, Mapping) else ():
            if key not in _FEAT_KEYS or (
                key == "channel" and value != 0
            ):  # channel 0: the audio itself
                mapping.unmapped[f"{where}.{name}.{key}"] = value
    if (
        not isinstance(source, Mapping)
        or source.get("feat_type") != "mel"
        or not source.get("log", False)
    ):
        kind = source.get("feat_type") if isinstance(source, Mapping) else source
        log = source.get("log", False) if isinstance(source, Mapping) else None
        mapping.differences.append(
            f"{where}.input is feat_type={kind!r} log={log!r}: our featurizer computes log-mel only, "
            "so these features cannot be made by `mockingjay featurize`"
        )
        return mapping
    if "target_level" in audio:
        mapping.differences.append(
            f"{where}.target_level={audio['target_level']}: s3prl scales each waveform to that dB level "
            "before the features and we do not (per-utterance CMVN cancels the gain except on near-silent frames)"
        )
    eps = float(audio.get("eps", 1e-10))
    delta = int(source.get("delta", 0))
    cmvn = "utterance" if source.get("cmvn", False) else "none"
    if cmvn == "utterance":
        mapping.differences.append(
            "s3prl's CMVN divides by the unbiased std + eps, ours by the biased std + 1e-5"
        )
    linear = isinstance(target, Mapping) and target.get("feat_type") == "linear"
    if linear:
        mapping.differences.append(
            "s3prl's linear target is log(power + eps), ours log(magnitude + log_offset): only the prediction head sees it"
        )
    elif target != source:
        mapping.unmapped[f"{where}.target"] = target
    return _feature_config(
        where,
        mapping,
        sample_rate=int(audio.get("sample_rate", S3PRL_SAMPLE_RATE)),
        n_mels=int(audio.get("n_mels", 40)),
        win_ms=float(audio.get("win_ms", 25)),
        hop_ms=float(audio.get("hop_ms", 10)),
        n_fft=2 * (int(audio.get("n_freq", 201)) - 1),
        delta_order=delta,
        delta_window=5,
        log_offset=eps,
        cmvn=cmvn,
        target="linear" if linear else "input",
    )


def _from_kaldi(audio: Mapping[str, Any], where: str) -> FeatureMapping:
    mapping = FeatureMapping()
    kaldi = audio["kaldi"] if isinstance(audio["kaldi"], Mapping) else {}
    kind = kaldi.get("feat_type", "fbank")
    fbank = kaldi.get(kind, {}) if isinstance(kaldi.get(kind, {}), Mapping) else {}
    for key, value in audio.items():
        if key not in ("kaldi", "delta", "cmvn"):
            mapping.unmapped[f"{where}.{key}"] = value
    for key, value in fbank.items():
        if key not in _FBANK_KEYS:
            mapping.unmapped[f"{where}.kaldi.{kind}.{key}"] = value
    if kind != "fbank" or not fbank.get("use_log_fbank", True):
        mapping.differences.append(
            f"{where}.kaldi is feat_type={kind!r} (use_log_fbank={fbank.get('use_log_fbank', True)}): "
            "our featurizer computes log-mel only, so these features cannot be made by `mockingjay featurize`"
        )
        return mapping
    mapping.differences.append(
        f"{where}.kaldi: Kaldi fbank (Povey window, pre-emphasis 0.97, DC removal, snip_edges framing, "
        "Kaldi mel banks from 20 Hz) is not our torchaudio log-mel; these are the nearest settings, "
        "expect a shift in the inputs the model sees"
    )
    win_ms = float(fbank.get("frame_length", 25.0))
    delta = audio.get("delta", {}) if isinstance(audio.get("delta", {}), Mapping) else {}
    cmvn = audio.get("cmvn", {}) if isinstance(audio.get("cmvn", {}), Mapping) else {}
    return _feature_config(
        where,
        mapping,
        sample_rate=S3PRL_SAMPLE_RATE,
        n_mels=int(fbank.get("num_mel_bins", 23)),
        win_ms=win_ms,
        hop_ms=float(fbank.get("frame_shift", 10.0)),
        n_fft=2 ** math.ceil(math.log2(round(win_ms * S3PRL_SAMPLE_RATE / 1000))),
        delta_order=int(delta.get("order", 2)),
        delta_window=int(delta.get("win_length", 5)),
        log_offset=float(
            torch.finfo(torch.float32).eps
        ),  # Kaldi floors the mel energies at FLT_EPSILON
        cmvn="utterance" if cmvn.get("use_cmvn", False) else "none",
    )


def audio_from_features(features: Mapping[str, Any] | None) -> tuple[dict | None, list[str]]:
    """s3prl's preprocessor `audio` section for our feature settings, and what it cannot say."""
    if not features:
        return None, [
            "the model records no feature settings, so the file has no `audio` section: s3prl's "
            "UpstreamExpert (on-the-fly features) cannot run it, PretrainedTransformer with inp_dim can"
        ]
    notes = [
        f"s3prl scales every waveform to target_level={S3PRL_TARGET_LEVEL} dB before the features (it "
        "requires the field); this model saw unscaled audio"
    ]
    cmvn = features.get("cmvn", "utterance")
    if cmvn == "global":
        notes.append(
            "the model was trained with global CMVN; s3prl can only apply per-utterance CMVN"
        )
    if features.get("delta_window", 5) != 5:
        notes.append(
            f"delta_window={features['delta_window']}: s3prl's deltas always use a window of 5"
        )
    if features.get("sample_rate") != S3PRL_SAMPLE_RATE or features.get("hop_ms") != 10.0:
        notes.append(
            f"sample_rate={features.get('sample_rate')} hop_ms={features.get('hop_ms')}: s3prl's "
            "UpstreamExpert assumes 16 kHz and a 10 ms hop (get_downsample_rates returns 160)"
        )
    delta = int(features.get("delta_order", 0))
    source = {"feat_type": "mel", "channel": 0, "log": True, "delta": delta, "cmvn": cmvn != "none"}
    linear = features.get("target") == "linear"
    target = {**source, "feat_type": "linear", "delta": 0} if linear else dict(source)
    if linear:
        notes.append("s3prl's linear target is log(power + eps), ours log(magnitude + log_offset)")
    audio = {
        "sample_rate": int(features["sample_rate"]),
        "win_ms": float(features["win_ms"]),
        "hop_ms": float(features["hop_ms"]),
        "n_freq": int(features["n_fft"]) // 2 + 1,
        "n_mels": int(features["n_mels"]),
        "n_mfcc": 13,
        "eps": float(features["log_offset"]),
        "target_level": S3PRL_TARGET_LEVEL,
        "input": source,
        "target": target,
    }
    return audio, notes
