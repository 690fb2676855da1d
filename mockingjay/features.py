"""Acoustic features: log-mel (+ deltas) with torchaudio, and CMVN.

The settings and the frame-count rule (`num_frames`, torchaudio's `center=True` convention)
are in `feature_config.py`.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

from .feature_config import FeatureConfig


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

    def _power(self, wave: torch.Tensor) -> torch.Tensor:
        """Power spectrogram [T, n_fft // 2 + 1] (torch.stft as torchaudio's Spectrogram calls it)."""
        spec = self.mel.spectrogram
        stft = torch.stft(
            wave,
            n_fft=spec.n_fft,
            hop_length=spec.hop_length,
            win_length=spec.win_length,
            window=spec.window,
            center=True,
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
            parts.append(torchaudio.functional.compute_deltas(parts[-1], win_length=self.config.delta_window))
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


class GlobalCMVN:
    """Running sums for dataset-level CMVN (accumulated on the training split only)."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_sq = np.zeros(dim, dtype=np.float64)

    def update(self, features: np.ndarray) -> None:
        feats = np.asarray(features, dtype=np.float64)
        self.count += feats.shape[0]
        self.sum += feats.sum(axis=0)
        self.sum_sq += np.square(feats).sum(axis=0)

    def merge(self, other: "GlobalCMVN") -> None:
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq

    def stats(self, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no training frames to compute global CMVN statistics from")
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - np.square(mean), 0.0)
        return mean.astype(np.float32), (np.sqrt(var) + eps).astype(np.float32)


def load_wave(
    path: str, extractor: FeatureExtractor, source_rate: int | None = None, segment: tuple[float, float] | None = None
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
    wave: torch.Tensor, extractor: FeatureExtractor, dtype=np.float32, stats: tuple[GlobalCMVN, GlobalCMVN] | None = None
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
        if np.dtype(dtype) == np.float16:
            array = torch.from_numpy(array).half().numpy()  # torch converts ~5x faster than numpy
        elif np.dtype(dtype) != array.dtype:
            array = array.astype(dtype)
        outputs.append(array)
    return outputs[0], outputs[1]


def featurize_file(
    path: str, extractor: FeatureExtractor, source_rate: int | None = None, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, resample, compute features (and the linear target when configured) for one file.

    Returns arrays [T, dim] and [T, target_dim] (or None) in `dtype` (float32 by default);
    per-utterance CMVN is applied here, global CMVN later, once the training-set statistics
    are known.
    """
    return featurize_wave(load_wave(path, extractor, source_rate), extractor, dtype)
