"""Typed experiment specs: one pydantic model per section, loaded from YAML or built in Python.

Every model forbids unknown fields, so a typo is an error naming the field path, and the
defaults run on a laptop (generated clips, tiny encoders, one CPU worker, local MLflow).
The `method` section is the union of the registered methods' sections (`workers.methods`).

This module imports neither torch nor PyAV: the driver validates specs without them, and every
Train worker validates the spec it receives back into these models.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.methods import StrictModel, get_method, method_names, method_sections
from workers.methods.supervised import NormalSection
from workers.uris import redact_uri, secret_in_uri

LAYOUTS = ("avtune", "cremad", "vggsound", "kinetics-sounds", "ave")
FUSIONS = ("sum", "concat", "film", "gated")
ENCODER_ARCHS = ("resnet10", "resnet18")
VISUAL_ARCHS = ("resnet10", "resnet18", "r2plus1d", "r3d")


class SpecError(ValueError):
    """A spec that does not validate; the message names each bad field path and what it allows."""


_Strict = StrictModel

# Default noise levels of the generator (audio_noise_std / visual_noise_std of synthesize_dataset).
DIFFICULTY_DEFAULTS = {"audio_noise_std": 0.03, "visual_noise_std": 12.0}
# What a generated clip's non-informative modality carries: another class's signature (conflict: the
# modalities contradict each other) or no signature (complement: only that modality's noise, a silent-
# but-noisy track or an empty scene, so the other modality can fill in).
UNINFORMATIVE_CONTENT = ("other_class", "no_signature")
CONTENT_DEFAULTS = {"audio_uninformative": "other_class", "visual_uninformative": "other_class"}
# Generator knobs added after the first cards: left out of cards and folder keys at their defaults.
ADDED_DEFAULTS = {**DIFFICULTY_DEFAULTS, **CONTENT_DEFAULTS}
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
MAX_SEED = 2**32 - 1  # numpy's seed range; torch takes it too
# Runs (MLflow child runs: trials x grouped seeds) one sweep may plan: each is a Ray Train run, an MLflow run and a
# row of every report, so more is a typo (100,000 seeds), not a study; refused before any trial spec is built.
MAX_SWEEP_RUNS = 10_000
# What one decoded clip (its uint8 frame pool, float32 frames, waveform, STFT and audio feature) and one batch
# of clips (the global batch: evaluation loaders take it whole on every worker) may take in memory. Each decode
# field has its own cap, but the caps multiply out (256 frames of 1024 x 1024, 60 s at 96 kHz with a 1-sample
# hop: 15 GB per clip); these bound the products, so a typo is refused here, not found as a killed worker.
MAX_CLIP_BYTES = 1 << 30
MAX_BATCH_BYTES = 16 << 30
# Per-epoch metrics a search can rank trials by (every classifier reports the first ones; the rest are
# the heads', OGM's and G-Blend's): a typo is refused here, not found when no best trial is tagged.
SEARCH_METRICS = ("acc", "loss", "best_acc", "acc_audio", "acc_visual", "loss_audio", "loss_visual", "loss_train",
                  "loss_train_eval", "gap_av", "shapley_audio", "shapley_visual", "k_audio", "k_visual", "ratio_av",
                  "gblend_w_audio", "gblend_w_visual", "gblend_w_joint", "epoch_seconds")


def drop_added_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the knobs added later (difficulty, uninformative content) that are at their
    defaults, so cards and generated-folder keys of existing parameter sets stay byte for byte the same."""
    return {k: v for k, v in params.items() if k not in ADDED_DEFAULTS or v != ADDED_DEFAULTS[k]}


class DecodeParams(StrictModel):
    """How clips are decoded and featurised (part of the experiment spec and of the cache key).

    ``audio_feature="logmel"``: :func:`workers.features.log_mel` with ``n_mels`` bins, ``win_ms``
    windows and ``hop_ms`` hop. ``"spectrogram"``: :func:`workers.features.spectrogram_ogm` with
    ``n_fft = round(win_ms * sr / 1000)`` and ``hop = round(hop_ms * sr / 1000)``; OGM-GE's CREMA-D
    setting (n_fft 512, hop 353 at 22050 Hz) is ``sample_rate_hz=22050, win_ms=23.22,
    hop_ms=16.01``, its VGGSound one (256 / 128 at 16 kHz) is ``win_ms=16, hop_ms=8``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Upper bounds keep one decoded clip to a bounded size (at most 256 x 1024 x 1024 x 3 bytes of
    # frames and 60 s of audio): a typo such as `clip_seconds: 1e9` is refused here, not found as
    # an out-of-memory worker.
    num_frames: int = Field(4, gt=0, le=256, description="video frames sampled uniformly per clip")
    frame_height: int = Field(64, gt=0, le=1024, description="height of the decoded frames (pixels)")
    frame_width: int = Field(64, gt=0, le=1024, description="width of the decoded frames (pixels)")
    sample_rate_hz: int = Field(16000, gt=0, le=96000, description="audio resampled to this rate (Hz)")
    clip_seconds: float = Field(1.0, gt=0, le=60, description="length of the decoded window (s)")
    audio_feature: Literal["logmel", "spectrogram", "fbank"] = Field("logmel", description=(
        "logmel (workers.features.log_mel), spectrogram (OGM-GE's log-magnitude STFT) or fbank "
        "(Kaldi-style log mel filterbank, torchaudio.compliance.kaldi, as the official Kinetics-Sounds and "
        "MLA preprocessing)"))
    n_mels: int = Field(40, gt=0, le=512, description="mel bins of logmel and fbank")
    win_ms: float = Field(25.0, gt=0, le=1000)
    hop_ms: float = Field(10.0, gt=0, le=1000)
    # Exact sizes in samples where an official loader gives them so (librosa.stft(n_fft=512,
    # hop_length=353)); left out of dumps when unset, so existing cache keys and params stay the same.
    n_fft: int | None = Field(None, gt=0, le=65536, exclude_if=lambda v: v is None, description=(
        "FFT size in samples (spectrogram: also its window); None: from win_ms (spectrogram) or the next power "
        "of two of the window (logmel)"))
    hop_samples: int | None = Field(None, gt=0, le=65536, exclude_if=lambda v: v is None,
                                    description="hop in samples; None: round(hop_ms * sample_rate_hz / 1000)")
    audio_frames: int | None = Field(None, gt=0, le=100000, exclude_if=lambda v: v is None, description=(
        "time frames the feature is zero-padded or cropped to (the official Kinetics-Sounds fbank: 1024); "
        "None: the frames the clip implies"))
    audio_mean: float | None = Field(None, exclude_if=lambda v: v is None, description=(
        "feature normalisation (x - audio_mean) / audio_std, as the official fbank preprocessing; None: none"))
    audio_std: float | None = Field(None, gt=0, exclude_if=lambda v: v is None)
    # Limits on the SOURCE media, checked before anything is decoded (workers.media.decode_clip).
    # The defaults admit every clip of the public datasets (CREMA-D, Kinetics-Sounds, VGGSound, AVE:
    # clips of at most ~10 s, frames up to 4K). Left out of dumps at their defaults (exclude_if),
    # so the cache key and the logged parameters of existing settings stay the same.
    max_source_pixels: int = Field(
        3840 * 2160, gt=0, exclude_if=lambda v: v == 3840 * 2160,
        description="refuse a video whose frames (source width * height) have more pixels than this",
    )
    max_source_seconds: float = Field(
        600.0, gt=0, exclude_if=lambda v: v == 600.0,
        description="refuse a video or audio file whose declared duration is longer than this (s)",
    )
    # Left out of dumps when None (exclude_if), so existing cache keys and logged parameters stay the same.
    pool_frames: int | None = Field(
        None, gt=0, le=256, exclude_if=lambda v: v is None,
        description=("frames decoded once per clip, uniformly spaced, into the cache (None: num_frames); training "
                     "draws num_frames of them when data.augment.random_frames, evaluation takes num_frames "
                     "uniformly spaced among them"),
    )
    normalize_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    normalize_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("normalize_std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"every channel's std must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _audio_sizes(self) -> "DecodeParams":
        if (self.audio_mean is None) != (self.audio_std is None):
            raise ValueError("give audio_mean and audio_std together (or neither)")
        window = self.n_fft if self.audio_feature == "spectrogram" and self.n_fft else self.window_samples
        if self.n_fft is not None and self.audio_feature != "spectrogram" and self.n_fft < self.window_samples:
            raise ValueError(f"n_fft {self.n_fft} is shorter than the {self.window_samples}-sample window (win_ms)")
        if window < 2 or self.hop_length < 1:
            raise ValueError(f"win_ms/n_fft and hop_ms/hop_samples give a {window}-sample window and a "
                             f"{self.hop_length}-sample hop at {self.sample_rate_hz} Hz: too short")
        return self

    @property
    def hop_length(self) -> int:
        """Audio hop in samples."""
        return self.hop_samples or int(round(self.hop_ms * self.sample_rate_hz / 1000.0))

    @property
    def window_samples(self) -> int:
        """Analysis window in samples from ``win_ms`` (a spectrogram's window is ``n_fft`` when given)."""
        return int(round(self.win_ms * self.sample_rate_hz / 1000.0))

    @model_validator(mode="after")
    def _pool_holds_the_frames(self) -> "DecodeParams":
        if self.pool_frames is not None and self.pool_frames < self.num_frames:
            raise ValueError(f"pool_frames {self.pool_frames} is smaller than num_frames {self.num_frames}: the pool "
                             "is what the num_frames frames are taken from")
        return self

    @property
    def decoded_frames(self) -> int:
        """Frames decoded (and cached) per clip: ``pool_frames``, else ``num_frames``."""
        return self.pool_frames or self.num_frames

    @property
    def fft_size(self) -> int:
        """Samples of the STFT: ``n_fft``, else the window (spectrogram) or its next power of two."""
        if self.n_fft:
            return self.n_fft
        return self.window_samples if self.audio_feature == "spectrogram" else 1 << (self.window_samples - 1).bit_length()

    def clip_bytes(self) -> dict[str, tuple[int, str]]:
        """Memory one decoded clip takes, per part, as (bytes, how it multiplies out)."""
        samples = int(round(self.clip_seconds * self.sample_rate_hz))
        stft_frames = 1 + samples // self.hop_length
        frames = self.audio_frames or stft_frames
        bins = self.fft_size // 2 + 1 if self.audio_feature == "spectrogram" else self.n_mels
        pixels = self.frame_height * self.frame_width * 3
        return {
            "audio": (samples * 4 + stft_frames * (self.fft_size // 2 + 1) * 8 + frames * bins * 4,
                      f"clip_seconds {self.clip_seconds:g} x sample_rate_hz {self.sample_rate_hz} / a "
                      f"{self.hop_length}-sample hop (hop_ms / hop_samples) = {stft_frames:,} STFT frames of "
                      f"{self.fft_size // 2 + 1} bins, a {frames:,} x {bins} feature (n_mels / n_fft / audio_frames)"),
            "video": (self.decoded_frames * pixels + self.num_frames * pixels * 4,
                      f"{self.decoded_frames} frames (num_frames / pool_frames) of frame_height {self.frame_height} "
                      f"x frame_width {self.frame_width} x 3 colours"),
        }

    def item_bytes(self) -> int:
        """Bytes of one clip in a batch: its float32 audio feature and frames."""
        samples = int(round(self.clip_seconds * self.sample_rate_hz))
        frames = self.audio_frames or 1 + samples // self.hop_length
        bins = self.fft_size // 2 + 1 if self.audio_feature == "spectrogram" else self.n_mels
        return 4 * (frames * bins + self.num_frames * self.frame_height * self.frame_width * 3)

    @model_validator(mode="after")
    def _clip_fits_in_memory(self) -> "DecodeParams":
        parts = self.clip_bytes()
        total = sum(size for size, _ in parts.values())
        if total > MAX_CLIP_BYTES:
            detail = "; ".join(f"{name} {size / 1e9:.3g} GB: {how}" for name, (size, how) in parts.items())
            raise ValueError(f"one clip decodes to {total / 1e9:.3g} GB ({detail}), more than the "
                             f"{MAX_CLIP_BYTES / 1e9:.3g} GB a clip may take: lower those fields")
        return self


class SynthSpec(_Strict):
    """Parameters of the generated clips (see `avtune data synth`)."""

    classes: int = Field(6, ge=2, le=64)
    clips_per_class: int = Field(50, ge=3, le=10000)
    clip_seconds: float = Field(1.0, gt=0, le=30)
    fps: int = Field(10, ge=1, le=60)
    height: int = Field(64, ge=16, le=512)
    width: int = Field(64, ge=16, le=512)
    sample_rate_hz: int = Field(16000, ge=4000, le=48000)
    audio_informative: float = Field(0.9, ge=0, le=1)
    visual_informative: float = Field(0.6, ge=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # Difficulty of recognising each modality's signature (orchestrator.synth module docstring).
    audio_noise_std: float = Field(DIFFICULTY_DEFAULTS["audio_noise_std"], ge=0, le=10,
                                   description="white noise std on the waveform (full scale 1)")
    visual_noise_std: float = Field(DIFFICULTY_DEFAULTS["visual_noise_std"], ge=0, le=255,
                                    description="pixel noise std (0-255)")
    audio_uninformative: Literal["other_class", "no_signature"] = Field(
        CONTENT_DEFAULTS["audio_uninformative"],
        description="what a non-informative clip's audio carries: another class's chord (conflict) or none (noise)")
    visual_uninformative: Literal["other_class", "no_signature"] = Field(
        CONTENT_DEFAULTS["visual_uninformative"],
        description="what a non-informative clip's video carries: another class's object (conflict) or none")
    split_fractions: tuple[float, float, float] = Field(DEFAULT_SPLIT_FRACTIONS, description=(
        "(train, val, test) shares of each class's clips; a larger val share resolves smaller differences"))

    @field_validator("split_fractions")
    @classmethod
    def _split_shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or value[0] <= 0 or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"split_fractions {list(value)}: shares >= 0, train > 0, summing to 1")
        return value

    def folder_key(self) -> str:
        """Stable short hash: the same parameters reuse the same generated folder (knobs added later are
        left out at their defaults, so existing folders keep their keys)."""
        params = drop_added_defaults(self.model_dump(mode="json"))
        if tuple(params["split_fractions"]) == DEFAULT_SPLIT_FRACTIONS:
            del params["split_fractions"]
        blob = json.dumps(params, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def field_bounds(model: type[StrictModel], name: str) -> tuple[float | None, float | None]:
    """(lowest, highest) value `model`'s field `name` allows (its ge / gt and le / lt), None where unbounded: for
    code that takes the same values outside the model (the generator's keyword arguments, `avtune data synth`)."""
    low = high = None
    for rule in model.model_fields[name].metadata:
        low = next((getattr(rule, k) for k in ("ge", "gt") if getattr(rule, k, None) is not None), low)
        high = next((getattr(rule, k) for k in ("le", "lt") if getattr(rule, k, None) is not None), high)
    return low, high


class AugmentSpec(_Strict):
    """Training-loader augmentation of the video frames, as the official loaders do it (workers/augment.py).

    Only the training loader is augmented; validation, test and the training split's evaluation loader see
    the plain clips. Crops are taken from the decoded frame (data.decode frame_height x frame_width) and
    resized back to that size, not from the source-resolution image the official loaders crop.
    """

    random_frames: bool = Field(False, description=(
        "draw num_frames of the data.decode.pool_frames cached frames per clip and epoch (needs pool_frames > "
        "num_frames)"))
    frame_draw: Literal["choice", "segment"] = Field("choice", description=(
        "with random_frames: 'choice' draws num_frames distinct pool frames uniformly, then sorts them "
        "(np.random.choice(..., replace=False) + sort, as OGM-GE's CramedDataset writes it); 'segment' draws one "
        "frame in each of num_frames equal segments of the pool (MMPareto's av_dataset.py)"))
    random_resized_crop: bool = Field(False, description=(
        "torchvision RandomResizedCrop per frame, back to frame_height x frame_width (bilinear, antialiased)"))
    horizontal_flip: bool = Field(False, description="torchvision RandomHorizontalFlip per frame, p = 0.5")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="share of the frame's area a crop covers (low, high)")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio (width / height) of a crop (low, high)")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"crop_scale {list(value)}: need 0 < low <= high <= 1 (shares of the frame's area)")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _ratio_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] or value[1] > 100:
            raise ValueError(f"crop_ratio {list(value)}: need 0 < low <= high <= 100 (width / height)")
        return value

    @model_validator(mode="after")
    def _draw_needs_random_frames(self) -> "AugmentSpec":
        if self.frame_draw != "choice" and not self.random_frames:
            raise ValueError(f"frame_draw {self.frame_draw!r} only applies with random_frames: true")
        return self

    @property
    def active(self) -> bool:
        """Whether the training loader is augmented at all."""
        return self.random_frames or self.random_resized_crop or self.horizontal_flip


class DataSpec(_Strict):
    source: Literal["generated", "dataset"] = "generated"
    layout: Literal["avtune", "cremad", "vggsound", "kinetics-sounds", "ave"] = "avtune"
    root: Path | None = Field(None, description="dataset root; generated data defaults to <runs_dir>/data/<hash>")
    synth: SynthSpec = SynthSpec()
    decode: DecodeParams = DecodeParams()
    cache: bool = True
    cache_dir: Path | None = Field(None, description="defaults to <root>/.avtune-cache")
    on_bad_media: Literal["error", "skip"] = "error"
    loader_workers: int = Field(0, ge=0, le=32)
    augment: AugmentSpec = Field(AugmentSpec(), description="training-loader augmentation (off by default)")

    @model_validator(mode="after")
    def _dataset_needs_root(self) -> "DataSpec":
        if self.source == "dataset" and self.root is None:
            raise ValueError("data.root is required when data.source is 'dataset'")
        return self

    @model_validator(mode="after")
    def _frames_to_draw_from(self) -> "DataSpec":
        if self.augment.random_frames and self.decode.decoded_frames <= self.decode.num_frames:
            raise ValueError(
                "data.augment.random_frames needs data.decode.pool_frames > data.decode.num_frames (the frames decoded "
                f"once per clip that each epoch draws from); got pool_frames {self.decode.pool_frames}, num_frames "
                f"{self.decode.num_frames}")
        return self


class ModelSpec(_Strict):
    audio_arch: Literal["resnet10", "resnet18"] = "resnet10"
    visual_arch: Literal["resnet10", "resnet18", "r2plus1d", "r3d"] = "resnet10"
    width: int = Field(16, ge=4, le=256, description="channels of the first ResNet stage")
    fusion: Literal["sum", "concat", "film", "gated"] = "concat"


# ---- methods: a discriminated union on `name`, one section per registered method ---------------

MethodSpec = Annotated[Union[method_sections()], Field(discriminator="name")]
METHOD_NAMES = method_names()


DEFAULT_GLOBAL_BATCH = 16
LR_SCHEDULES = ("step", "constant", "cosine")


class TrainSpec(_Strict):
    epochs: int = Field(3, ge=1, le=10000)
    # The batch by name: Ray Train's prepare_data_loader keeps a loader's batch per worker, so one bare
    # `batch_size` reads as global in a paper and trains as per-worker on 4 workers (4x the official batch).
    global_batch_size: int | None = Field(None, ge=1, le=65536, description=(
        "clips per optimiser step over all workers, divided evenly over scaling.num_workers "
        f"(refused when it does not divide); {DEFAULT_GLOBAL_BATCH} when neither batch field is given"))
    batch_size_per_worker: int | None = Field(None, ge=1, le=4096, description=(
        "clips per optimiser step on each worker (global batch = this x scaling.num_workers); "
        "give this or global_batch_size, not both"))
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: float = Field(0.01, gt=0, le=10, description="base rate; never rescaled with the batch or the workers")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(False, description="SGD with Nesterov momentum (PySlowFast SOLVER.NESTEROV)")
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["step", "constant", "cosine"] = Field("step", description=(
        "step: x lr_decay_ratio every lr_decay_step epochs (StepLR); constant; cosine: PySlowFast's "
        "lr_policy cosine over the run's epochs, evaluated every step (workers.schedules)"))
    lr_decay_step: int = Field(70, ge=1, description="epochs between StepLR decays (lr_schedule step)")
    lr_decay_ratio: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, description=(
        "linear warm-up from warmup_start_lr to the schedule's rate at warmup_epochs (PySlowFast WARMUP_EPOCHS)"))
    warmup_start_lr: float = Field(0.0, ge=0, le=10, description="PySlowFast SOLVER.WARMUP_START_LR")
    cosine_end_lr: float = Field(0.0, ge=0, le=10, description="PySlowFast SOLVER.COSINE_END_LR (rate at the last epoch)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="initialisation and data order (torch, numpy, random)")
    train_split_loss: bool = Field(False, description=(
        "also measure, at the end of every epoch, the model's loss on the whole training split in eval mode "
        "(loss_train_eval*): G-Blend's L^T_N (Wang et al., Sec. 3.2); its estimation stage turns this on"))
    bf16_autocast: bool = False
    channels_last: bool = False
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig: worker-group restarts from the last checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _no_bare_batch_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch_size" in data:
            raise ValueError("batch_size is ambiguous over several workers: give global_batch_size (clips per "
                             "optimiser step over all workers) or batch_size_per_worker")
        return data

    @model_validator(mode="after")
    def _one_batch_field(self) -> "TrainSpec":
        if self.global_batch_size is not None and self.batch_size_per_worker is not None:
            raise ValueError("give global_batch_size or batch_size_per_worker, not both")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with a momentum > 0")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} is longer than the run's {self.epochs} epochs")
        return self


class ScalingSpec(_Strict):
    num_workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, le=256)


class TrackingSpec(_Strict):
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else sqlite under storage.runs_dir")
    experiment: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200,
                                   description="None: the spec's name (also a folder name: letters, digits, . _ -)")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        # A spec is logged as run params and a spec.yaml artifact (neither can be edited afterwards) and
        # uploaded by `avtune submit`: a credential in it would be stored in clear for good.
        found = secret_in_uri(uri) if uri else None
        if found:
            raise ValueError(
                f"{redact_uri(uri)} holds {found}, which would be stored in clear in every run's params and "
                "spec.yaml: give the URI without it and the credentials in MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or the whole URI in MLFLOW_TRACKING_URI / "
                "--tracking-uri, whose credentials avtune moves into those variables")
        return uri


class StorageSpec(_Strict):
    runs_dir: Path = Path("runs")


class SearchDimension(_Strict):
    """One searched field: exactly one of grid / choice / uniform / loguniform."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} must list at least one value")
        if given[0] in ("uniform", "loguniform"):
            low, high = values
            if not low < high:
                raise ValueError(f"{given[0]} needs low < high, got {values}")
            if given[0] == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs a positive low bound, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)


class SearchSpec(_Strict):
    """A Ray Tune search over spec field paths (`method.alpha`, `model.fusion`, ...)."""

    space: dict[str, SearchDimension] = Field(default_factory=dict)
    compare: list[Literal[METHOD_NAMES]] = Field(
        default_factory=list, description="methods run side by side on the same data and seeds")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list, description=(
        "train.seed values crossed with every configuration (compared methods and baselines included): "
        "each configuration runs once per seed on the same clips and splits, so comparisons are paired"))
    group_seeds: bool = Field(True, description=(
        "train all seeds of a configuration in one trial (one Ray Train run, the seeds side by side, each its "
        "own MLflow child run; a scheduler such as ASHA decides on their mean): a run's fixed start-up is paid "
        "once per configuration, not once per seed. false: one trial per (configuration, seed)"))
    group_estimation: bool = Field(True, description=(
        "train the G-Blend estimation stage's three models (audio-only, visual-only, joint) side by side in one "
        "trial, one Ray Train start-up instead of three; false: three parallel trials, faster in wall time "
        "where at least three worker slots are free"))
    searcher: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Literal[SEARCH_METRICS] = Field("acc", description="a per-epoch metric every trial reports")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, le=10000)
    max_concurrent_trials: int = Field(1, ge=1, le=1024)
    trial_cpus: float = Field(0.0, ge=0, description=(
        "CPU share of the Tune trial itself (it waits on its Train run); its Train workers get scaling.*. With the "
        "default 0 the trial reserves trial_memory_mb instead (Tune needs some resource): any CPU share would "
        "leave 2 x 1-CPU trials on 2 CPUs one whole CPU short, and only one would train at a time"))
    trial_memory_mb: int = Field(512, ge=1, le=1024 * 1024, description=(
        "memory Ray reserves for each Tune trial actor (its process holds torch, Ray Train and MLflow: ~0.5 GB)"))
    trial_max_failures: int = Field(1, ge=0, description=(
        "Tune FailureConfig: re-runs of a trial whose Train run gave up (e.g. its node was lost); "
        "worker crashes are already retried from checkpoints by train.max_failures; 0 for deterministic code"))
    asha_grace_epochs: int = Field(1, ge=1)
    asha_reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSpec":
        if not self.space and not self.compare and not self.seeds:
            raise ValueError("search.space is empty: give at least one field to search, a compare list or seeds")
        self._within_run_cap()
        if self.seeds and "train.seed" in self.space:
            raise ValueError("search.seeds and search.space['train.seed'] both set the seed: keep one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"search.seeds: {self.seeds} repeats a seed")
        for path in self.space:
            if path.split(".")[0] not in ("data", "model", "method", "train", "scaling"):
                raise ValueError(f"search.space: {path!r} is not a searchable spec field path (data./model./method./train./scaling.)")
        if self.searcher == "optuna":
            grids = [p for p, d in self.space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"search.searcher optuna cannot sample grid dimensions {grids}: use choice")
        return self


    def planned_runs(self) -> tuple[int, int, str]:
        """(trials, MLflow child runs, how they multiply out) of the main stage, by arithmetic on the
        search section alone: counted before any trial spec is built or validated. An upper bound where
        `compare` lists methods whose configurations coincide (the sweep runs those once)."""
        grids = {path: len(dim.grid) for path, dim in self.space.items() if dim.kind == "grid"}
        method_grids = {path.split(".", 1)[1]: n for path, n in grids.items() if path.startswith("method.")}
        other = math.prod(n for path, n in grids.items() if not path.startswith("method."))
        if self.compare:
            configs = sum(math.prod(n for key, n in method_grids.items() if key in get_method(name).Section.model_fields)
                          for name in dict.fromkeys(self.compare))
        else:
            configs = math.prod(method_grids.values())
        grouped = self.group_seeds and len(self.seeds) >= 2
        seeds = max(len(self.seeds), 1)
        trials = self.num_samples * other * configs * (1 if grouped else seeds)
        how = (f"num_samples {self.num_samples} x {other} grid combination(s) of search.space x {configs} method "
               f"configuration(s) x {seeds} seed(s)")
        return trials, trials * (seeds if grouped else 1), how

    def _within_run_cap(self) -> None:
        trials, runs, how = self.planned_runs()
        if runs > MAX_SWEEP_RUNS:
            raise ValueError(f"search plans {runs:,} runs ({how}; {trials:,} trials), more than the {MAX_SWEEP_RUNS:,} "
                             "a sweep may run: fewer search.seeds, grid values or search.num_samples")


class ExperimentSpec(_Strict):
    name: str = Field("avtune", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    method: MethodSpec = NormalSection()
    train: TrainSpec = TrainSpec()
    scaling: ScalingSpec = ScalingSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentSpec":
        workers, batch = self.scaling.num_workers, self.train.global_batch_size or DEFAULT_GLOBAL_BATCH
        if self.train.batch_size_per_worker is None and batch % workers:
            raise ValueError(f"train.global_batch_size {batch} does not divide over scaling.num_workers {workers}: "
                             "give a multiple of the workers, or train.batch_size_per_worker")
        batch_bytes = self.global_batch * self.data.decode.item_bytes()
        if batch_bytes > MAX_BATCH_BYTES:
            raise ValueError(f"a batch of {self.global_batch} clips (train.global_batch_size / batch_size_per_worker x "
                             f"scaling.num_workers; evaluation takes the global batch on each worker) of "
                             f"{self.data.decode.item_bytes() / 1e6:.3g} MB each (data.decode) is "
                             f"{batch_bytes / 1e9:.3g} GB, more than the {MAX_BATCH_BYTES / 1e9:.3g} GB a batch may take")
        problems = get_method(self.method.name).spec_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def global_batch(self) -> int:
        """Clips per optimiser step over all workers."""
        if self.train.batch_size_per_worker is not None:
            return self.train.batch_size_per_worker * self.scaling.num_workers
        return self.train.global_batch_size or DEFAULT_GLOBAL_BATCH

    @property
    def worker_batch(self) -> int:
        """Clips per optimiser step on each Train worker (what its DataLoader is given)."""
        return self.global_batch // self.scaling.num_workers


# ---- loading, overrides and error text ----------------------------------------------------


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] == "method" and loc[1] in METHOD_NAMES:
            del loc[1]  # the union's tag is not a field the user wrote
        path = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg = f"{msg} (allowed: {', '.join(METHOD_NAMES)})"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {path or '<root>'}: {msg}")
    return "\n".join(lines)


def validate_spec(data: Any, source: str = "<python>") -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, source)) from None


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter for specs: no anchors or aliases (an alias expands after validation,
    so a "billion laughs" spec or a self-reference would only blow up later, in dumps, job submissions
    and error texts) and no duplicate keys (YAML keeps the last one silently)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            name = getattr(event, "anchor", "")
            raise SpecError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&{name} / *{name}) are not "
                            "allowed in a spec: write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise SpecError(f"line {line}: duplicate key {key!r} (first at line {first_line[key]}); "
                                "YAML would silently keep the last one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.fusion=film` -> (["model", "fusion"], "film"); the value is parsed as YAML (safe)."""
    if "=" not in text:
        raise SpecError(f"override {text!r}: expected KEY=VALUE, e.g. model.fusion=film")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"override {text!r}: empty field name in {key!r}")
    try:
        return parts, load_yaml(raw) if raw.strip() else ""
    except SpecError as err:
        raise SpecError(f"override {text!r}: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    data = json.loads(json.dumps(data, default=str))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override {text!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_spec(path_or_data: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Load and validate a spec from a YAML file (safe loader) or a dict, then apply `k=v` overrides."""
    if isinstance(path_or_data, dict):
        data, source = path_or_data, "<dict>"
    else:
        path = Path(path_or_data)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise SpecError(f"cannot read spec {path}: {err.strerror or err}") from None
        try:
            data = load_yaml(text)
        except yaml.YAMLError as err:
            raise SpecError(f"spec {path} is not valid YAML: {err}") from None
        except SpecError as err:
            raise SpecError(f"spec {path}, {err}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec {source}: the top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_spec(data, source)


def dump_spec_yaml(spec: ExperimentSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=False), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out
