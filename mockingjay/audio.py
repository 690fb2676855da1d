"""Reading and validating speech audio: decode with soundfile, down-mix, resample to 16 kHz.

Every check raises `AudioError` naming the file, so a stage can either stop on the first
bad file or collect all of them and report each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

TARGET_SAMPLE_RATE = 16_000
# Files longer than this are read in blocks (`audio_blocks`) by prepare's checks and featurize: whole, a
# 5-minute file is a few hundred MB of intermediate arrays, 3 hours were 5.4 GB. Shorter files keep the
# one-shot path, whose output every result so far was computed with.
STREAM_ABOVE_SEC = 300.0


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


def _open(
    path: Path, segment: tuple[float, float] | None, max_duration_sec: float | None
) -> tuple[sf.SoundFile, int]:
    """The file open and positioned at the segment's start, and the frames to read (-1: to the end).
    Every error is the file's AudioError; nothing is decoded yet."""
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
    declared_frames, source_rate = f.frames, f.samplerate
    try:
        if segment is not None:
            first, last = round(segment[0] * source_rate), round(segment[1] * source_rate)
            if not 0 <= first < last or (declared_frames > 0 and last > declared_frames):
                raise AudioError(
                    path,
                    "bad_segment",
                    f"segment {segment[0]:.3f}-{segment[1]:.3f} s is outside the file "
                    f"({declared_frames / source_rate:.3f} s)",
                )
            f.seek(first)
            declared_frames = last - first
        if max_duration_sec is not None and declared_frames / source_rate > max_duration_sec:
            raise AudioError(
                path,
                "too_long",
                f"too long: {declared_frames / source_rate:.1f} s, over prepare.max_duration_s ({max_duration_sec:g} s); "
                "cut it into utterances (a Kaldi segments file) or raise the limit (null = none)",
            )
    except BaseException:
        f.close()
        raise
    return f, declared_frames if segment is not None else -1


def _read(f: sf.SoundFile, path: Path, frames: int) -> np.ndarray:
    """Decode `frames` frames (-1: the rest) as float32 [n, channels]; NaN/inf and broken streams are errors."""
    try:
        data = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(path, "truncated", f"truncated or corrupted audio stream ({err})") from err
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, "non_finite", f"contains {bad} NaN or inf samples")
    return data


def _check_length(path: Path, decoded: int, declared: int) -> None:
    if decoded == 0:
        raise AudioError(path, "zero_samples", "contains zero samples")
    if declared > 0 and decoded < declared:
        raise AudioError(
            path, "truncated", f"truncated: decoded {decoded} of {declared} declared frames"
        )


def read_audio(
    path: str | Path,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    min_duration_sec: float = 0.0,
    segment: tuple[float, float] | None = None,
    max_duration_sec: float | None = None,
) -> Audio:
    """Decode, validate, down-mix (channel mean) and resample one file.

    Raises AudioError for: unreadable or non-audio bytes, truncated streams (fewer frames
    decoded than the header promises), zero samples, NaN or inf samples, and clips shorter
    than `min_duration_sec` (for example shorter than one feature window).

    `segment` = (start, end) in seconds reads only that part of the file (Kaldi `segments`);
    a segment that ends past the end of the file is an error, not a silently shorter clip.

    `max_duration_sec`: a longer file (or segment) is refused from its header, before anything is
    decoded (AudioError `too_long`), so that an unsegmented recording of hours never costs gigabytes.
    """
    path = Path(path)
    f, frames = _open(path, segment, max_duration_sec)
    with f:
        declared_frames = frames if frames > 0 else f.frames
        source_rate, channels = f.samplerate, f.channels
        data = _read(f, path, frames)
    _check_length(path, data.shape[0], declared_frames)
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
    return Audio(
        np.ascontiguousarray(samples, dtype=np.float32), target_sample_rate, source_rate, channels
    )


def checked_length(
    path: str | Path,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    segment: tuple[float, float] | None = None,
    max_duration_sec: float | None = None,
) -> tuple[int, int, int]:
    """(samples at the target rate, source rate, source channels) of a file over STREAM_ABOVE_SEC, with
    read_audio's checks, decoded block by block: prepare's validation in bounded memory."""
    path = Path(path)
    f, _ = _open(path, segment, max_duration_sec)
    with f:
        source_rate, channels = f.samplerate, f.channels
    return (
        sum(len(b) for b in audio_blocks(path, target_sample_rate, segment)),
        source_rate,
        channels,
    )


def header_seconds(path: str | Path, segment: tuple[float, float] | None = None) -> float | None:
    """The duration the header declares (the segment's, if given); None if the file cannot be opened
    (read_audio then names the problem)."""
    if segment is not None:
        return segment[1] - segment[0]
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - any unreadable file: read_audio reports it properly
        return None
    return info.frames / info.samplerate if info.samplerate else None


def audio_blocks(
    path: str | Path,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    segment: tuple[float, float] | None = None,
    block_sec: float = 60.0,
) -> Iterator[np.ndarray]:
    """`read_audio(path, target_sample_rate, segment=segment).samples` in consecutive blocks of about
    `block_sec` seconds, for files too long to hold whole: only a block is in memory at a time. The
    same checks (AudioError at the block where one fails) and the same values: down-mixing is per
    sample, and resampling is `BlockResampler`, read_audio's filter applied block by block."""
    path = Path(path)
    f, frames = _open(path, segment, None)
    with f:
        declared = frames if frames > 0 else f.frames
        source_rate, channels = f.samplerate, f.channels
        resampler = (
            None
            if source_rate == target_sample_rate
            else BlockResampler(source_rate, target_sample_rate)
        )
        block, decoded = max(1, round(block_sec * source_rate)), 0
        while frames < 0 or decoded < frames:
            data = _read(f, path, block if frames < 0 else min(block, frames - decoded))
            if data.shape[0] == 0:
                break
            decoded += data.shape[0]
            samples = np.ascontiguousarray(
                data.mean(axis=1) if channels > 1 else data[:, 0], dtype=np.float32
            )
            if resampler is not None:
                samples = resampler(samples)
            if len(samples):
                yield samples
        _check_length(path, decoded, declared)
        if resampler is not None:
            yield resampler(np.zeros(0, np.float32), final=True)


class BlockResampler:
    """torchaudio's sinc resampling (as `resample`) of a signal that arrives in blocks.

    torchaudio pads the whole signal with `width` zeros before and `width + orig` after, convolves
    with stride `orig` (the rates divided by their gcd) and keeps ceil(new x n / orig) samples. Here
    the input is kept in a buffer from the first sample the next output position reads, so every
    output sees exactly the inputs (and zeros at the ends) that it sees in the one-shot call.
    """

    def __init__(self, source_rate: int, target_rate: int):
        import torch
        import torchaudio

        transform = torchaudio.transforms.Resample(source_rate, target_rate, dtype=torch.float32)
        self.kernel, self.width = transform.kernel, transform.width
        self.orig, self.new = source_rate // transform.gcd, target_rate // transform.gcd
        self.buffer = np.zeros(self.width, np.float32)  # the leading zero padding
        self.received = self.emitted = 0

    def __call__(self, samples: np.ndarray, final: bool = False) -> np.ndarray:
        import torch

        self.received += len(samples)
        parts = [self.buffer, samples] + (
            [np.zeros(self.width + self.orig, np.float32)] if final else []
        )
        self.buffer = np.concatenate(parts)
        span = 2 * self.width + self.orig  # input samples one output position reads
        positions = max(0, (len(self.buffer) - span) // self.orig + 1)
        if positions == 0:
            return np.zeros(0, np.float32)
        used = self.buffer[: (positions - 1) * self.orig + span]
        out = torch.nn.functional.conv1d(
            torch.from_numpy(used)[None, None], self.kernel, stride=self.orig
        )
        out = out[0].T.reshape(-1).numpy()
        self.buffer = self.buffer[positions * self.orig :]
        if final:
            out = out[: max(0, -(-self.new * self.received // self.orig) - self.emitted)]
        self.emitted += len(out)
        return out


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited sinc resampling with torchaudio's default (Hann-windowed) kernel."""
    # Imported on first use: prepare and align read audio without torch when no file needs resampling.
    import torch
    import torchaudio.functional as AF

    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return AF.resample(wave, source_rate, target_rate).numpy()
