"""Reading and validating speech audio: decode with soundfile, down-mix, resample to 16 kHz.

Every check raises `AudioError` naming the file, so a stage can either stop on the first
bad file or collect all of them and report each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

TARGET_SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """An audio file cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail}")

    def __reduce__(self):  # survive the trip back from a worker process
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def was_resampled(self) -> bool:
        return self.source_sample_rate != self.sample_rate

    @property
    def was_downmixed(self) -> bool:
        return self.source_channels > 1


def read_audio(
    path: str | Path,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    min_duration_sec: float = 0.0,
    segment: tuple[float, float] | None = None,
) -> Audio:
    """Decode, validate, down-mix (channel mean) and resample one file.

    Raises AudioError for: unreadable or non-audio bytes, truncated streams (fewer frames
    decoded than the header promises), zero samples, NaN or inf samples, and clips shorter
    than `min_duration_sec` (for example shorter than one feature window).

    `segment` = (start, end) in seconds reads only that part of the file (Kaldi `segments`);
    a segment that ends past the end of the file is an error, not a silently shorter clip.
    """
    path = Path(path)
    try:
        open(path, "rb").close()  # libsndfile reports a refused open only as "System error"
        f = sf.SoundFile(str(path))
    except PermissionError as err:
        raise AudioError(path, "unreadable", f"permission denied ({err.strerror})") from err
    except FileNotFoundError as err:
        raise AudioError(path, "missing", "file not found") from err
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        if path.is_file() and path.stat().st_size == 0:
            raise AudioError(path, "empty", "empty file (0 bytes)") from err
        raise AudioError(path, "unreadable", f"not readable as audio ({err})") from err
    with f:
        declared_frames = f.frames
        source_rate = f.samplerate
        channels = f.channels
        if segment is not None:
            first, last = round(segment[0] * source_rate), round(segment[1] * source_rate)
            if not 0 <= first < last or (declared_frames > 0 and last > declared_frames):
                raise AudioError(
                    path, "bad_segment",
                    f"segment {segment[0]:.3f}-{segment[1]:.3f} s is outside the file "
                    f"({declared_frames / source_rate:.3f} s)",
                )
            f.seek(first)
            declared_frames = last - first
        try:
            data = f.read(frames=declared_frames if segment is not None else -1, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise AudioError(path, "truncated", f"truncated or corrupted audio stream ({err})") from err
    if data.shape[0] == 0:
        raise AudioError(path, "zero_samples", "contains zero samples")
    if declared_frames > 0 and data.shape[0] < declared_frames:
        raise AudioError(
            path, "truncated", f"truncated: decoded {data.shape[0]} of {declared_frames} declared frames"
        )
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, "non_finite", f"contains {bad} NaN or inf samples")
    samples = data.mean(axis=1) if channels > 1 else data[:, 0]
    if source_rate != target_sample_rate:
        samples = resample(samples, source_rate, target_sample_rate)
    duration = len(samples) / target_sample_rate
    if duration < min_duration_sec:
        raise AudioError(
            path,
            "too_short",
            f"too short: {duration * 1000:.1f} ms, shorter than one feature window ({min_duration_sec * 1000:.1f} ms)",
        )
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), target_sample_rate, source_rate, channels)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited sinc resampling with torchaudio's default (Hann-windowed) kernel."""
    # Imported on first use: prepare and align read audio without torch when no file needs resampling.
    import torch
    import torchaudio.functional as AF

    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return AF.resample(wave, source_rate, target_rate).numpy()
