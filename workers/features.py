"""Audio features computed with torch / torchaudio transforms (no torchaudio I/O).

Two representations, both returned as ``(1, T, F)`` float32 (time first, frequency last):

* :func:`log_mel`: log mel-spectrogram, e.g. 40 mel bins, 25 ms windows, 10 ms hop, so one second
  gives 100 x 40 as in the Gradient-Blending audio setup (Wang et al., CVPR 2020).
* :func:`spectrogram_ogm`: the log-magnitude STFT the official OGM-GE loaders build with librosa
  (``OGM-GE_CVPR2022/dataset/CramedDataset.py``, ``__getitem__``: clip to [-1, 1],
  ``librosa.stft(n_fft=512, hop_length=353)``, ``np.log(np.abs(S) + 1e-7)``), computed here with
  ``torch.stft``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torchaudio

__all__ = ["log_mel", "spectrogram_ogm", "kaldi_fbank", "ms_to_samples", "log_mel_num_frames", "stft_num_frames",
           "fbank_num_frames"]

# Floor added before the log of mel power, so digital silence maps to log(1e-6) ~ -13.8
# instead of -inf.
LOG_MEL_FLOOR = 1e-6
# OGM-GE: np.log(np.abs(spectrogram) + 1e-7)  (dataset/CramedDataset.py, dataset/VGGSoundDataset.py)
OGM_LOG_OFFSET = 1e-7


def ms_to_samples(milliseconds: float, sample_rate_hz: int) -> int:
    """``round(milliseconds * sample_rate_hz / 1000)``."""
    return int(round(milliseconds * sample_rate_hz / 1000.0))


def log_mel_num_frames(num_samples: int, hop_length: int) -> int:
    """Frames a clip of ``num_samples`` implies at ``hop_length``: ``num_samples // hop_length``

    (1 s at 16 kHz with a 10 ms hop -> 100 frames).
    """
    return num_samples // hop_length


def stft_num_frames(num_samples: int, hop_length: int) -> int:
    """Frames of a centred STFT, as librosa returns: ``1 + num_samples // hop_length``.

    (OGM-GE CREMA-D: 3 s at 22050 Hz, hop 353 -> 188 frames.)
    """
    return 1 + num_samples // hop_length


def fbank_num_frames(num_samples: int, sample_rate_hz: int, win_ms: float, hop_ms: float) -> int:
    """Frames of a Kaldi fbank with ``snip_edges=True``: ``1 + (N - window) // shift``, window and shift
    truncated to samples as ``torchaudio.compliance.kaldi`` does (10 s at 16 kHz, 25/10 ms -> 998)."""
    window = int(sample_rate_hz * win_ms * 0.001)
    shift = int(sample_rate_hz * hop_ms * 0.001)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def _fit_frames(features: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Zero-pad or crop ``(T, F)`` along time to ``num_frames``."""
    length = features.shape[0]
    if length >= num_frames:
        return features[:num_frames]
    return torch.nn.functional.pad(features, (0, 0, 0, num_frames - length))


def _check_waveform(waveform: torch.Tensor, sample_rate_hz: int) -> torch.Tensor:
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be 1-D (N,), got shape {tuple(waveform.shape)}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    return waveform.to(torch.float32)


@lru_cache(maxsize=16)
def _mel_transform(
    sample_rate_hz: int, n_fft: int, win_length: int, hop_length: int, n_mels: int
) -> torchaudio.transforms.MelSpectrogram:
    # Cached because building the mel filterbank dominates the cost for 1 s clips.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate_hz,
        n_fft=n_fft,
        win_length=win_length,
        hop_length=hop_length,
        n_mels=n_mels,
        power=2.0,
        center=True,
        mel_scale="htk",
    )


def _centred_stft(waveform: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor) -> torch.Tensor:
    """Complex one-sided STFT ``(n_fft // 2 + 1, 1 + N // hop)`` with reflect-padded centred frames and a
    window already ``n_fft`` long (torchaudio's Spectrogram and the OGM-GE spectrogram both frame so)."""
    return torch.stft(waveform, n_fft=n_fft, hop_length=hop_length, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", normalized=False, onesided=True, return_complex=True)


@lru_cache(maxsize=16)
def _mel_parts(
    sample_rate_hz: int, n_fft: int, win_length: int, hop_length: int, n_mels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The STFT window zero-padded to ``n_fft`` and the mel filterbank ``(n_fft // 2 + 1, n_mels)``
    of :func:`_mel_transform`.

    ``torch.stft`` centres a window shorter than ``n_fft`` in zeros on every call; padded once
    here (the same zeros, the same placement), the frames it multiplies are the same.
    """
    transform = _mel_transform(sample_rate_hz, n_fft, win_length, hop_length, n_mels)
    window = transform.spectrogram.window
    padded = torch.zeros(n_fft, dtype=window.dtype)
    left = (n_fft - win_length) // 2
    padded[left : left + win_length] = window
    return padded, transform.mel_scale.fb


def log_mel(
    waveform: torch.Tensor,
    sample_rate_hz: int,
    n_mels: int = 40,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    n_fft: int | None = None,
    *,
    num_frames: int | None = None,
    hop_length: int | None = None,
) -> torch.Tensor:
    """Log mel-spectrogram of a mono waveform.

    Args:
        waveform: float ``(N,)``.
        sample_rate_hz: sampling rate of ``waveform``.
        n_mels: mel bins (HTK mel scale, 0 Hz to Nyquist).
        win_ms, hop_ms: Hann window length and hop in milliseconds.
        n_fft: FFT size; default the next power of two >= the window length (512 for 25 ms at
            16 kHz).
        num_frames: output frames; default ``N // hop`` (the frames the clip length implies).
        hop_length: hop in samples, instead of ``hop_ms``.

    Returns:
        float32 ``(1, num_frames, n_mels)`` = ``log(max(mel_power, 1e-6))``, zero-padded or cropped
        in time.
    """
    waveform = _check_waveform(waveform, sample_rate_hz)
    win_length = ms_to_samples(win_ms, sample_rate_hz)
    hop_length = hop_length or ms_to_samples(hop_ms, sample_rate_hz)
    if win_length <= 0 or hop_length <= 0 or n_mels <= 0:
        raise ValueError(
            f"win_ms={win_ms}, hop_ms={hop_ms} give {win_length}/{hop_length} samples and "
            f"n_mels={n_mels}; all must be positive"
        )
    if n_fft is None:
        n_fft = 1 << (win_length - 1).bit_length()
    if n_fft < win_length:
        raise ValueError(f"n_fft={n_fft} is shorter than the window ({win_length} samples)")
    window, filterbank = _mel_parts(sample_rate_hz, n_fft, win_length, hop_length, n_mels)
    with torch.no_grad():
        # _mel_transform(...)(waveform) without the module calls: the same torch.stft, |.|^2 and
        # filterbank product torchaudio's Spectrogram and MelScale run, in the same order and
        # memory layout, so the values are identical.
        spec = _centred_stft(waveform, n_fft, hop_length, window)  # (n_fft // 2 + 1, 1 + N // hop)
        power = spec.abs().pow_(2.0)
        mel = torch.matmul(power.transpose(0, 1), filterbank)  # (1 + N // hop, n_mels)
        features = mel.clamp_(min=LOG_MEL_FLOOR).log_()  # mel is a fresh tensor: in place
    if num_frames is None:
        num_frames = log_mel_num_frames(waveform.shape[0], hop_length)
    return _fit_frames(features, num_frames).unsqueeze(0).contiguous()


def spectrogram_ogm(
    waveform: torch.Tensor,
    sample_rate_hz: int,
    n_fft: int = 512,
    hop_length: int = 353,
    *,
    num_frames: int | None = None,
) -> torch.Tensor:
    """OGM-GE's log-magnitude spectrogram, computed with ``torch.stft``.

    Follows ``OGM-GE_CVPR2022/dataset/CramedDataset.py`` (``__getitem__``): samples clipped to
    [-1, 1]; ``librosa.stft(y, n_fft=512, hop_length=353)`` whose defaults are
    ``win_length = n_fft``, a periodic Hann window and ``center=True``; the official code ran on
    librosa < 0.10 whose centre padding is ``pad_mode="reflect"``; then ``log(|S| + 1e-7)``.
    (Their VGGSound loader uses ``n_fft=256, hop_length=128`` at 16 kHz.)

    Args:
        waveform: float ``(N,)``.
        num_frames: output frames; default ``1 + N // hop_length`` (librosa's count).

    Returns:
        float32 ``(1, num_frames, n_fft // 2 + 1)``.
    """
    waveform = _check_waveform(waveform, sample_rate_hz)
    if n_fft <= 0 or hop_length <= 0:
        raise ValueError(f"n_fft={n_fft} and hop_length={hop_length} must be positive")
    clipped = waveform.clamp(-1.0, 1.0)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32)
    with torch.no_grad():
        stft = _centred_stft(clipped, n_fft, hop_length, window)  # (n_fft // 2 + 1, 1 + N // hop)
    features = torch.log(stft.abs() + OGM_LOG_OFFSET).transpose(0, 1)
    if num_frames is None:
        num_frames = stft_num_frames(waveform.shape[0], hop_length)
    return _fit_frames(features, num_frames).unsqueeze(0).contiguous()


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate_hz: int,
    n_mels: int = 128,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    *,
    num_frames: int | None = None,
) -> torch.Tensor:
    """Kaldi-style log mel filterbank as the official Kinetics-Sounds and MLA preprocessing computes it.

    ``waveform - waveform.mean()`` then ``torchaudio.compliance.kaldi.fbank(htk_compat=True,
    use_energy=False, window_type="hanning", dither=0.0, num_mel_bins=n_mels, frame_length=win_ms,
    frame_shift=hop_ms)`` (the AST-style front end of OGM-GE's ``data/KineticSound/process_audio.py`` and
    MLA's ``data/extract_fbank.py``), zero-padded or cropped in time to ``num_frames``.

    Returns:
        float32 ``(1, num_frames, n_mels)``; default ``num_frames`` the frames the clip gives.
    """
    from torchaudio.compliance import kaldi  # imported here: the other front ends do not need it

    waveform = _check_waveform(waveform, sample_rate_hz)
    if fbank_num_frames(waveform.shape[0], sample_rate_hz, win_ms, hop_ms) < 1:
        raise ValueError(f"a {waveform.shape[0]}-sample clip is shorter than one {win_ms} ms fbank window")
    with torch.no_grad():
        features = kaldi.fbank((waveform - waveform.mean()).unsqueeze(0), htk_compat=True,
                               sample_frequency=sample_rate_hz, use_energy=False, window_type="hanning",
                               num_mel_bins=n_mels, dither=0.0, frame_length=win_ms, frame_shift=hop_ms)
    if num_frames is None:
        num_frames = features.shape[0]
    return _fit_frames(features, num_frames).unsqueeze(0).contiguous()


def audio_feature(waveform: torch.Tensor, params) -> torch.Tensor:
    """The audio feature ``params`` (a ``workers.specs.DecodeParams``) asks for, ``(1, T, F)`` float32 with
    ``(T, F)`` = :func:`feature_shape`'s, normalised when the params give ``audio_mean`` / ``audio_std``."""
    _, frames, _ = feature_shape(params)
    sr = params.sample_rate_hz
    if params.audio_feature == "logmel":
        features = log_mel(waveform, sr, n_mels=params.n_mels, win_ms=params.win_ms, hop_ms=params.hop_ms,
                           n_fft=params.n_fft, num_frames=frames, hop_length=params.hop_samples)
    elif params.audio_feature == "spectrogram":
        features = spectrogram_ogm(waveform, sr, n_fft=params.n_fft or params.window_samples,
                                   hop_length=params.hop_length, num_frames=frames)
    else:
        features = kaldi_fbank(waveform, sr, n_mels=params.n_mels, win_ms=params.win_ms, hop_ms=params.hop_ms,
                               num_frames=frames)
    if params.audio_mean is not None:
        features = (features - params.audio_mean) / params.audio_std
    return features


def feature_shape(params) -> tuple[int, int, int]:
    """Shape ``(1, T, F)`` of one clip's audio feature under ``params`` (a ``workers.specs.DecodeParams``)."""
    num_samples = int(round(params.clip_seconds * params.sample_rate_hz))
    if params.audio_feature == "logmel":
        frames, bins = log_mel_num_frames(num_samples, params.hop_length), params.n_mels
    elif params.audio_feature == "spectrogram":
        frames, bins = stft_num_frames(num_samples, params.hop_length), (params.n_fft or params.window_samples) // 2 + 1
    else:
        frames, bins = fbank_num_frames(num_samples, params.sample_rate_hz, params.win_ms, params.hop_ms), params.n_mels
    return (1, params.audio_frames or frames, bins)
