"""Acoustic features: log-mel (+ deltas) with torchaudio, and CMVN.

The settings and the frame-count rule (`num_frames`, torchaudio's `center=True` convention)
are in `feature_config.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
import torchaudio

from .audio import audio_blocks
from .feature_config import FeatureConfig
from .moments import Moments


class FeatureExtractor(torch.nn.Module):
    """Waveform [n] -> un-normalised features [T, dim] (log-mel, then deltas stacked on the dims).

    The values are those of torchaudio's `MelSpectrogram` (power 2, centred, reflect padding),
    `log(mel + log_offset)` and `compute_deltas`; the STFT is taken once and shared with the
    linear target, and the power spectrum is re^2 + im^2 rather than |z|.pow(2) (the same
    value to within a rounding step; |z| alone costs more than the FFT).
    """

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            center=True,
            power=2.0,
        )
        self._resamplers: dict[int, torchaudio.transforms.Resample] = {}

    def _power(self, wave: torch.Tensor, center: bool = True) -> torch.Tensor:
        """Power spectrogram [T, n_fft // 2 + 1] (torch.stft as torchaudio's Spectrogram calls it);
        `center=False`: frames of a signal padded already (stream_features)."""
        spec = self.mel.spectrogram
        stft = torch.stft(
            wave,
            n_fft=spec.n_fft,
            hop_length=spec.hop_length,
            win_length=spec.win_length,
            window=spec.window,
            center=center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        squares = torch.view_as_real(stft.T).square()  # [T, F, 2]; stft.T is the contiguous layout
        return squares[..., 0] + squares[..., 1]  # [T, F]

    def _log_mel(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.mel.mel_scale.fb)  # [T, n_mels], as MelScale computes it
        return torch.log_(mel.add_(self.config.log_offset))

    def _with_deltas(self, log_mel: torch.Tensor) -> torch.Tensor:
        if self.config.delta_order == 0:
            return log_mel
        parts = [log_mel.T]  # compute_deltas works on [..., freq, time]
        for _ in range(self.config.delta_order):
            parts.append(
                torchaudio.functional.compute_deltas(parts[-1], win_length=self.config.delta_window)
            )
        return torch.cat(parts, dim=0).T.contiguous()

    @torch.inference_mode()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self._with_deltas(self._log_mel(self._power(wave)))

    @torch.inference_mode()
    def linear_target(self, wave: torch.Tensor) -> torch.Tensor:
        """log(|STFT| + log_offset) [T, n_fft // 2 + 1]."""
        if self.config.target != "linear":
            raise RuntimeError("linear target not configured (featurize.target: linear)")
        return torch.log_(self._power(wave).sqrt().add_(self.config.log_offset)).contiguous()

    @torch.inference_mode()
    def features_and_target(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both outputs from one STFT: features [T, dim] and the linear target (or None)."""
        power = self._power(wave)
        feats = self._with_deltas(self._log_mel(power))
        if self.config.target != "linear":
            return feats, None
        return feats, torch.log_(power.sqrt().add_(self.config.log_offset)).contiguous()

    def resampler(self, source_rate: int) -> torchaudio.transforms.Resample:
        """A cached resampler to the feature rate: torchaudio.functional.resample rebuilds its sinc
        kernel on every call; this one builds it once (in float32, so the output is identical)."""
        if source_rate not in self._resamplers:
            self._resamplers[source_rate] = torchaudio.transforms.Resample(
                source_rate, self.config.sample_rate, dtype=torch.float32
            )
        return self._resamplers[source_rate]


def utterance_cmvn(features, eps: float = 1e-5):
    """Per-utterance mean and variance normalisation over time, per feature dimension.

    Takes and returns a torch tensor or a numpy array [T, D] (float32). The statistics are
    computed with numpy, which reduces over time about twice as fast as torch does.
    """
    if isinstance(features, torch.Tensor):
        return torch.from_numpy(utterance_cmvn(features.detach().cpu().numpy(), eps))
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    out = features - mean
    out /= std + eps
    return out


class GlobalCMVN(Moments):
    """Running sums for dataset-level CMVN (accumulated on the training split only): mean and
    std + eps, float32."""

    def stats(self, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no training frames to compute global CMVN statistics from")
        mean, std = self.mean_std()
        return mean.astype(np.float32), (std + eps).astype(np.float32)


def load_wave(
    path: str,
    extractor: FeatureExtractor,
    source_rate: int | None = None,
    segment: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Decode and validate one file (audio.read_audio) and resample it to the feature rate.

    `source_rate` is the file's own rate when known (the manifest records it): the file is then
    decoded at that rate and resampled with the extractor's cached kernel. If the file turns out
    to have another rate, it is decoded again the ordinary way, so the hint never changes a result.
    """
    from .audio import read_audio

    target_rate = extractor.config.sample_rate
    if source_rate is None or source_rate == target_rate:
        return torch.from_numpy(read_audio(path, target_rate, segment=segment).samples)
    audio = read_audio(path, source_rate, segment=segment)
    if audio.source_sample_rate != source_rate:
        return torch.from_numpy(read_audio(path, target_rate, segment=segment).samples)
    return extractor.resampler(source_rate)(torch.from_numpy(audio.samples))


def featurize_wave(
    wave: torch.Tensor,
    extractor: FeatureExtractor,
    dtype=np.float32,
    stats: tuple[GlobalCMVN, GlobalCMVN] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and linear target) of one waveform as numpy arrays in `dtype`.

    Per-utterance CMVN is applied here when configured; global CMVN is applied later, once the
    training-set statistics are known, and `stats` (input, target) accumulates them from the
    float32 values before any conversion to `dtype`.
    """
    config = extractor.config
    feats_t, target_t = extractor.features_and_target(wave)
    outputs = []
    for i, out in enumerate((feats_t, target_t)):
        if out is None:
            outputs.append(None)
            continue
        array = out.numpy()
        if config.cmvn == "utterance":
            array = utterance_cmvn(array)
        if stats is not None:
            stats[i].update(array)
        outputs.append(as_dtype(array, dtype))
    return outputs[0], outputs[1]


def as_dtype(array: np.ndarray, dtype) -> np.ndarray:
    if np.dtype(dtype) == np.float16:
        return torch.from_numpy(array).half().numpy()  # torch converts ~5x faster than numpy
    return array if np.dtype(dtype) == array.dtype else array.astype(dtype)


def featurize_file(
    path: str, extractor: FeatureExtractor, source_rate: int | None = None, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, resample, compute features (and the linear target when configured) for one file.

    Returns arrays [T, dim] and [T, target_dim] (or None) in `dtype` (float32 by default);
    per-utterance CMVN is applied here, global CMVN later, once the training-set statistics
    are known.
    """
    return featurize_wave(load_wave(path, extractor, source_rate), extractor, dtype)


# Features of a file too long to hold whole, computed block by block (featurize's long-file path).
#
# A 3-hour file took featurize to 5.4 GB: the waveform, its STFT and every intermediate array exist
# at once for the whole file. Here only a block (`block_sec` of audio) is in memory at a time, and
# the result is `featurize_wave(load_wave(...))`'s up to float rounding:
#
# - audio: `audio.audio_blocks` (soundfile's block reading, the resampler carried across blocks);
# - STFT: torchaudio's centred frames are those of the signal with `n_fft // 2` reflected samples
#   on each side, so the stream is padded that way (the head from the first block, the tail from the
#   last samples) and cut into frames with the `n_fft - hop` overlap carried to the next block;
# - deltas: each block is computed with `delta_order x delta_window // 2` frames of context on either
#   side and cropped, so only the file's first and last frames see the edge padding, as in one call;
# - per-utterance CMVN needs the whole file's mean and std: a first pass computes them (float64,
#   combined over blocks), a second pass recomputes the features and normalises them.
#
# Rounding differs from the one-shot computation (block-wise resampling and convolutions, statistics
# summed in another order), so featurize takes this path only for files over `audio.STREAM_ABOVE_SEC`
# and keeps the one-shot path, byte for byte, for every ordinary file.

Blocks = Iterator[tuple[np.ndarray, np.ndarray | None]]


def _padded_frames(
    waves: Iterator[np.ndarray], extractor: FeatureExtractor
) -> Iterator[torch.Tensor]:
    """Power spectrogram blocks of the centred STFT of the concatenated `waves` (>= n_fft // 2 + 1 samples)."""
    config = extractor.config
    pad, hop, n_fft = config.n_fft // 2, config.hop_length, config.n_fft
    buffer = np.zeros(0, np.float32)
    tail = np.zeros(0, np.float32)  # the last pad + 1 samples: the reflected end
    started = False

    def frames() -> Iterator[torch.Tensor]:
        nonlocal buffer
        if len(buffer) >= n_fft:
            count = (len(buffer) - n_fft) // hop + 1
            yield extractor._power(
                torch.from_numpy(buffer[: (count - 1) * hop + n_fft]), center=False
            )
            buffer = buffer[count * hop :]

    for wave in waves:
        if not started:  # torch's reflect padding: x[pad], ..., x[1] before x[0]
            wave = np.concatenate([wave[pad:0:-1], wave])
            started = True
        buffer = np.concatenate([buffer, wave])
        tail = np.concatenate([tail, wave])[-(pad + 1) :]
        yield from frames()
    buffer = np.concatenate([buffer, tail[-2::-1]])  # x[n - 2], ..., x[n - pad - 1] after x[n - 1]
    yield from frames()


def _raw_blocks(path: str, extractor: FeatureExtractor, segment, block_sec: float) -> Blocks:
    """Un-normalised (features, linear target or None) float32 blocks of one file, in frame order."""
    config = extractor.config
    context = config.delta_order * (config.delta_window // 2)
    log_mel = torch.zeros(0, config.n_mels)  # frames [first, first + len) of the file's log-mel
    first = done = 0
    target = None
    # chain, not [*blocks, None]: a list would hold the whole file's power spectrogram (the memory
    # grew by 7.5 MiB a minute of audio; tests/test_long_inputs.py measures it)
    powers = _padded_frames(audio_blocks(path, config.sample_rate, segment, block_sec), extractor)
    for power in itertools.chain(powers, [None]):
        final = power is None
        if not final:
            target = (
                torch.log_(power.sqrt().add_(config.log_offset))
                if config.target == "linear"
                else None
            )
            log_mel = torch.cat([log_mel, extractor._log_mel(power)])
        end = (
            first + len(log_mel) if final else first + len(log_mel) - context
        )  # frames whose context is here
        if end > done:
            feats = extractor._with_deltas(log_mel)[done - first : end - first]
            yield feats.numpy(), None
        done = max(done, end)
        keep_from = max(first, done - context)  # the next block's left context
        log_mel, first = log_mel[keep_from - first :], keep_from
        if target is not None and not final:
            yield None, target.numpy()  # the target has no deltas: each block as it comes


def stream_features(
    path: str,
    extractor: FeatureExtractor,
    segment=None,
    dtype=np.float16,
    stats: tuple[GlobalCMVN, GlobalCMVN] | None = None,
    block_sec: float = 60.0,
) -> Blocks:
    """Blocks of `featurize_wave(load_wave(path, ...))`'s two outputs, (features, None) and (None,
    target) in frame order per output, in `dtype`; `stats` accumulates global-CMVN sums as there."""
    config = extractor.config
    scales: list = [None, None]
    if config.cmvn == "utterance":  # first pass: the file's mean and std per dimension
        moments = [GlobalCMVN(config.dim), GlobalCMVN(config.target_dim)]
        for blocks in _raw_blocks(path, extractor, segment, block_sec):
            for i, block in enumerate(blocks):
                if block is not None:
                    moments[i].update(block)
        scales = [m.stats(eps=1e-5) if m.count else None for m in moments]  # (mean, std + eps)
    for blocks in _raw_blocks(path, extractor, segment, block_sec):
        out = []
        for i, block in enumerate(blocks):
            if block is not None:
                if scales[i] is not None:  # as utterance_cmvn: (x - mean) / (std + eps) in float32
                    block = block - scales[i][0]
                    block /= scales[i][1]
                if stats is not None:
                    stats[i].update(block)
                block = as_dtype(block, dtype)
            out.append(block)
        yield out[0], out[1]
