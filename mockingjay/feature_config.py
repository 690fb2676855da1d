"""The feature settings (the `featurize` section of params.yaml) and the frame-count rule.

Frames follow torchaudio's `center=True` convention: the signal is padded by n_fft // 2 on
both sides, frame t is centred at t * hop, and an utterance of n samples has
`1 + n // hop` frames (`num_frames`). Phone labels use the same centres (see phones.py), so
features and labels always have the same length.

Apart from `features.py` because the stages read these before any work starts (to validate
params, or to check a model against its features), and importing torch for that would make
every command's start, `--help` and parameter errors included, seconds slower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

FEATURE_PRESETS: dict[str, dict] = {
    # TERA (arXiv 2007.06028): 80 log-mel, 25 ms / 10 ms. The default: 10 ms matches phone labels.
    "tera": dict(n_mels=80, win_ms=25.0, hop_ms=10.0, n_fft=400, delta_order=0),
    # Mockingjay paper: 80 log-mel + 80 delta, n_fft 2048, 50 ms window, 12.5 ms hop.
    "paper": dict(n_mels=80, win_ms=50.0, hop_ms=12.5, n_fft=2048, delta_order=1),
    # s3prl's mockingjay configs: 80 fbank + delta + delta-delta = 240 dims, 25 ms / 10 ms.
    "s3prl": dict(n_mels=80, win_ms=25.0, hop_ms=10.0, n_fft=400, delta_order=2),
}


@dataclass(frozen=True)
class FeatureConfig:
    """The `featurize` section of params.yaml (preset values fill what is not set)."""

    preset: Literal["tera", "paper", "s3prl", "custom"] = "tera"
    sample_rate: int = 16_000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 400
    delta_order: int = 0
    delta_window: int = 5
    log_offset: float = 1e-6
    cmvn: Literal["utterance", "global", "none"] = "utterance"
    # "linear": also store a log linear-magnitude spectrogram target (n_fft // 2 + 1 dims) for paper-large.
    target: Literal["input", "linear"] = "input"
    workers: int = 0  # 0 = one per CPU core

    def validate(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate: must be positive, got {self.sample_rate}")
        if self.n_mels <= 0:
            raise ValueError(f"n_mels: must be positive, got {self.n_mels}")
        if self.win_ms <= 0:
            raise ValueError(f"win_ms: must be positive, got {self.win_ms}")
        if self.hop_ms <= 0:
            raise ValueError(f"hop_ms: must be positive, got {self.hop_ms}")
        if self.win_length > self.n_fft:
            raise ValueError(
                f"n_fft: {self.n_fft} is shorter than the window ({self.win_length} samples at win_ms={self.win_ms})"
            )
        if abs(self.hop_ms * self.sample_rate / 1000 - self.hop_length) > 1e-6:
            raise ValueError(
                f"hop_ms: {self.hop_ms} ms is not a whole number of samples at {self.sample_rate} Hz"
            )
        if self.delta_order not in (0, 1, 2):
            raise ValueError(f"delta_order: must be 0, 1 or 2, got {self.delta_order}")
        if self.delta_window < 3 or self.delta_window % 2 == 0:
            raise ValueError(f"delta_window: must be odd and >= 3, got {self.delta_window}")
        if self.log_offset <= 0:
            raise ValueError(f"log_offset: must be positive, got {self.log_offset}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")

    @property
    def win_length(self) -> int:
        return int(round(self.win_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.hop_ms * self.sample_rate / 1000))

    @property
    def hop_sec(self) -> float:
        return self.hop_length / self.sample_rate

    @property
    def frame_rate(self) -> float:
        """Feature frames per second of audio: 100 at a 10 ms hop, 80 at the paper's 12.5 ms."""
        return self.sample_rate / self.hop_length

    @property
    def dim(self) -> int:
        return self.n_mels * (1 + self.delta_order)

    @property
    def target_dim(self) -> int:
        return self.dim if self.target == "input" else self.n_fft // 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


def feature_config(section: dict | None = None) -> dict:
    """Merge a params section over its preset's values (explicit keys win)."""
    section = dict(section or {})
    preset = section.get("preset", "tera")
    merged = dict(FEATURE_PRESETS.get(preset, {}))
    merged.update({k: v for k, v in section.items() if v is not None})  # null = the preset's value
    return merged


def frames_per_second(settings: Mapping) -> float:
    """The frame rate of recorded feature settings (feature_config.json, a feature store's attrs).

    Every audio-seconds figure divides frames by this, never by a fixed 100: under the paper
    preset a frame is 12.5 ms, and 100 frames are 1.25 s of audio.
    """
    return FeatureConfig(
        sample_rate=int(settings["sample_rate"]), hop_ms=float(settings["hop_ms"])
    ).frame_rate


def num_frames(num_samples: int, hop_length: int) -> int:
    """Frames of a centred STFT: frame t covers the window centred at sample t * hop_length."""
    return 1 + num_samples // hop_length
