"""Audio-Visual Instance Discrimination with Cross-Modal Agreement (Morgado, Vasconcelos, Misra, CVPR 2021).

* :class:`AVIDModel`: audio and visual encoders plus MLP projection heads to L2-normalised embeddings.
* :class:`MemoryBank`: one per modality, an exponential moving average of each training item's
  embedding, renormalised after every update.
* :class:`AVIDCriterion`: AVID's instance discrimination, cross-modal (video embedding against the
  audio memory and vice versa) and/or within-modal, with the NCE loss of the official code.
* :class:`CMACriterion`: AVID-CMA: instance discrimination plus *positive-set* discrimination, where
  each item's positives are the items its memory agrees with in both modalities.
* :func:`linear_probe_accuracy`: the evaluation protocol's linear classifier on frozen features.
* :func:`parse_avid_config`: official criterion names ("Cross-N1024", "InstX-N1024-PosW-N64-Top32").

Official sources followed (facebookresearch/AVID-CMA, read, not copied):

* ``criterions/nce.py`` ``NCECriterion``: NCE with a noise distribution whose partition function
  ``Z`` is the mean ``exp(score)`` of the negatives of the *first* batch, then frozen; for ``K``
  negatives ``P(model | pos) = e^{s+} / (e^{s+} + K Z)`` and ``P(noise | neg) = K Z / (e^{s-} + K Z)``;
  loss = mean over the batch of ``-mean_pos log P(model|pos) - sum_neg log P(noise|neg)``.
  It is *not* a softmax InfoNCE.
* ``criterions/avid.py`` ``AVIDSimilarityMemoryBank`` / ``AVID``: temperature 0.07, memory banks
  initialised ``normalize(randn)``, update ``m <- normalize(momentum * m + (1 - momentum) * x)``,
  negatives drawn uniformly from the other ``N - 1`` items (``idx + (idx >= y)``), cross-modal terms
  ``v2a`` / ``a2v`` and within-modal ``v2v`` / ``a2a``, each pair averaged, coefficients normalised to
  sum to one. Scores use the memory *before* this batch's update.
* ``criterions/avid_cma.py`` ``CMASampler`` / ``AVIDSimilarityPositiveExpansion`` / ``AVID_CMA``:
  positive set = top-``pos_k`` items by the *consensus* similarity ``min(video_sim, audio_sim)`` of
  memory entries (``union`` = max, or one modality alone), self excluded; negatives drawn uniformly
  from the ``N - pos_k`` items outside the positive set; instance terms use all negatives, the
  within-modal positive terms only the first ``num_negatives_within``; the set is recomputed every
  ``resample_freq`` epochs (``set_epoch``).
* ``configs/main/avid/*/Cross-N1024.yaml``: 1024 negatives, momentum 0.5, ``xModal_coeff`` 1,
  ``wModal_coeff`` 0; ``configs/main/avid-cma/*/InstX-N1024-PosW-N64-Top32.yaml``: momentum 0.5,
  1024 negatives, ``num_negatives_within`` 64, ``xModalInstCoeff`` 1, ``wModalPosCoeff`` 1, the
  other two 0, ``sampling_args: {type: consensus, pos_k: 32}``, ``resample_freq`` 5 (Kinetics; 10
  on AudioSet); ``proj_dim: [512, 512, 128]`` (``models/av_wrapper.py`` ``Head``).
* ``utils/eval_utils.py`` ``Classifier`` and ``configs/benchmark/kinetics/8x224x224-linear.yaml``:
  linear evaluation = BatchNorm on frozen features then one linear layer, Adam, weight decay 0.

Deliberate differences:

* The memory update is a separate call (:meth:`AVIDCriterion.update_memory`, after the loss) instead
  of inside ``forward``; scores still use the pre-update memory, as in the official code.
* Negatives are drawn with ``torch.randint`` from a passed generator instead of the alias method
  (both are uniform).
* The CMA positive set excludes the item itself explicitly; the official code takes the top
  ``pos_k + 1`` and drops the first, which is the item itself unless exact ties occur.
* Within-modal *instance* terms (``InstW``) compute ``v2v`` / ``a2a``; the official
  ``AVIDSimilarityPositiveExpansion.forward`` stores them under the cross-modal keys (a copy slip
  that no official config exercises).
* Linear probe: standardisation with the training features' statistics (BatchNorm's effect) and
  full-batch Adam for ``epochs`` steps, instead of mini-batch Adam at lr 1e-4 for 12 epochs.
* A CMA run starts from whatever is in the memory banks; the paper starts CMA from a trained AVID
  model and its memory (official ``checkpoint:`` key): use :meth:`CMACriterion.from_avid`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders import build_audio_encoder, build_visual_encoder

__all__ = [
    "AVEmbeddings",
    "AVIDConfig",
    "AVIDCriterion",
    "AVIDModel",
    "CMACriterion",
    "MemoryBank",
    "build_avid_model",
    "linear_probe_accuracy",
    "nce_loss",
    "parse_avid_config",
]

# criterions/avid.py: self.temperature = 0.07; configs: momentum 0.5.
OFFICIAL_TEMPERATURE = 0.07
OFFICIAL_MOMENTUM = 0.5
SAMPLING_TYPES = ("consensus", "union", "video", "audio")


# ---- model -------------------------------------------------------------------------------------


class AVEmbeddings(NamedTuple):
    """Output of :class:`AVIDModel` (a NamedTuple so DDP can traverse it).

    Attributes:
        audio: (B, E) L2-normalised audio embedding.
        visual: (B, E) L2-normalised visual embedding.
        features_audio: (B, D_a) audio encoder output (for linear probes).
        features_visual: (B, D_v) visual encoder output (for linear probes).
    """

    audio: Tensor
    visual: Tensor
    features_audio: Tensor
    features_visual: Tensor


class _ProjectionHead(nn.Sequential):
    """Official ``Head``: Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> None:
        layers: list[nn.Module] = []
        for d in hidden_dims:
            layers += [nn.Linear(in_dim, d), nn.ReLU(inplace=True)]
            in_dim = d
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


class AVIDModel(nn.Module):
    """Audio and visual encoders with projection heads to L2-normalised embeddings.

    Args:
        audio_encoder: (B, 1, T, F) -> (B, D_a) module with attribute ``out_dim``.
        visual_encoder: (B, 3, T, H, W) -> (B, D_v) module with attribute ``out_dim``.
        embedding_dim: E (paper: 128).
        hidden_dims: hidden widths of the projection MLPs (official ``proj_dim: [512, 512, 128]``).

    Forward: ``(audio, visual) -> AVEmbeddings``.
    """

    has_probe_heads = False

    def __init__(self, audio_encoder: nn.Module, visual_encoder: nn.Module, embedding_dim: int = 128,
                 hidden_dims: tuple[int, ...] = (512, 512)) -> None:
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.embedding_dim = embedding_dim
        self.audio_proj = _ProjectionHead(audio_encoder.out_dim, tuple(hidden_dims), embedding_dim)
        self.visual_proj = _ProjectionHead(visual_encoder.out_dim, tuple(hidden_dims), embedding_dim)

    def forward(self, audio: Tensor, visual: Tensor) -> AVEmbeddings:
        features_audio = self.audio_encoder(audio)
        features_visual = self.visual_encoder(visual)
        return AVEmbeddings(
            audio=F.normalize(self.audio_proj(features_audio), dim=1),
            visual=F.normalize(self.visual_proj(features_visual), dim=1),
            features_audio=features_audio,
            features_visual=features_visual,
        )


def build_avid_model(audio_arch: str = "resnet18", visual_arch: str = "resnet18", width: int = 64,
                     embedding_dim: int = 128) -> AVIDModel:
    """AVID / CMA model. The paper uses ``visual_arch="r2plus1d"`` (R(2+1)D-18) and a 10-layer 2-D
    audio ConvNet (``audio_arch="resnet10"`` is the closest here); ``embedding_dim`` 128."""
    return AVIDModel(build_audio_encoder(audio_arch, width), build_visual_encoder(visual_arch, width),
                     embedding_dim=embedding_dim)


# ---- config names ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AVIDConfig:
    """Criterion hyper-parameters; :func:`parse_avid_config` builds one from an official name.

    Attributes:
        name: the config name it was parsed from.
        num_negatives: negatives per item drawn from the memory bank (official ``num_negatives``).
        xmodal_inst_coeff / wmodal_inst_coeff: cross- / within-modal instance discrimination weights.
        xmodal_pos_coeff / wmodal_pos_coeff: cross- / within-modal positive-set discrimination weights.
        num_negatives_within: negatives for the within-modal positive terms (``None``: all).
        pos_k: positive-set size (0: no CMA).
        sampling: agreement rule, one of ``SAMPLING_TYPES``.
        momentum: memory bank momentum (0.5).
        temperature: score temperature (0.07).
        resample_freq: recompute the positive set every this many epochs (-1: never).
    """

    name: str
    num_negatives: int = 1024
    xmodal_inst_coeff: float = 1.0
    wmodal_inst_coeff: float = 0.0
    xmodal_pos_coeff: float = 0.0
    wmodal_pos_coeff: float = 0.0
    num_negatives_within: int | None = None
    pos_k: int = 0
    sampling: str = "consensus"
    momentum: float = OFFICIAL_MOMENTUM
    temperature: float = OFFICIAL_TEMPERATURE
    resample_freq: int = -1

    @property
    def uses_positives(self) -> bool:
        return self.pos_k > 0 and (self.xmodal_pos_coeff > 0 or self.wmodal_pos_coeff > 0)

    def validate(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"{self.name}: num_negatives must be >= 1, got {self.num_negatives}")
        coeffs = (self.xmodal_inst_coeff, self.wmodal_inst_coeff, self.xmodal_pos_coeff, self.wmodal_pos_coeff)
        if any(c < 0 for c in coeffs) or sum(coeffs) <= 0:
            raise ValueError(f"{self.name}: loss coefficients must be >= 0 and not all zero, got {coeffs}")
        if (self.xmodal_pos_coeff > 0 or self.wmodal_pos_coeff > 0) and self.pos_k < 1:
            raise ValueError(f"{self.name}: positive-set terms need pos_k >= 1, got {self.pos_k}")
        if self.num_negatives_within is not None and not 1 <= self.num_negatives_within <= self.num_negatives:
            raise ValueError(f"{self.name}: num_negatives_within must be in [1, num_negatives={self.num_negatives}], "
                             f"got {self.num_negatives_within}")
        if self.sampling not in SAMPLING_TYPES:
            raise ValueError(f"{self.name}: sampling must be one of {SAMPLING_TYPES}, got {self.sampling!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{self.name}: momentum must be in [0, 1), got {self.momentum}")
        if not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature}")


_MODAL_LETTERS = {"X": (1.0, 0.0), "W": (0.0, 1.0), "XW": (1.0, 1.0)}
_AVID_KINDS = {"Cross": (1.0, 0.0), "Self": (0.0, 1.0), "Joint": (1.0, 1.0)}  # (xModal_coeff, wModal_coeff)


def _parse_count(name: str, part: str, pos: int, prefix: str) -> int:
    m = re.fullmatch(prefix + r"([1-9][0-9]*)", part)
    if m is None:
        raise ValueError(f"AVID config {name!r}: part {pos + 1} {part!r} should be {prefix}<positive int>")
    return int(m.group(1))


def parse_avid_config(name: str, momentum: float = OFFICIAL_MOMENTUM, temperature: float = OFFICIAL_TEMPERATURE,
                      resample_freq: int = 5) -> AVIDConfig:
    """Parse an official criterion name.

    Grammar (dash-separated parts):

    * AVID: ``{Cross|Self|Joint}-N<negatives>`` (paper's Cross-, Self- and Joint-AVID; official
      ``xModal_coeff`` / ``wModal_coeff`` of 1/0, 0/1, 1/1).
    * AVID-CMA: ``Inst{X|W|XW}-N<negatives>[-Pos{X|W|XW}-N<within negatives>-Top<pos_k>[-<Sampling>]]``
      where X = cross-modal, W = within-modal, ``N<within>`` is ``num_negatives_within`` and
      ``<Sampling>`` (our extension, default Consensus) is Consensus, Union, Video or Audio.

    ``resample_freq`` applies to names with a positive set (official Kinetics value 5).

    Raises:
        ValueError: naming the part that does not fit.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"AVID config name must be a non-empty string, got {name!r}")
    parts = name.split("-")
    head = parts[0]
    if head in _AVID_KINDS:
        if len(parts) != 2:
            raise ValueError(f"AVID config {name!r}: expected '{head}-N<negatives>', got {len(parts)} parts")
        x, w = _AVID_KINDS[head]
        cfg = AVIDConfig(name=name, num_negatives=_parse_count(name, parts[1], 1, "N"), xmodal_inst_coeff=x,
                         wmodal_inst_coeff=w, momentum=momentum, temperature=temperature, resample_freq=-1)
        cfg.validate()
        return cfg
    m = re.fullmatch(r"Inst(XW|X|W)", head)
    if m is None:
        raise ValueError(f"AVID config {name!r}: part 1 {head!r} should be Cross, Self, Joint or Inst{{X|W|XW}}")
    if len(parts) < 2:
        raise ValueError(f"AVID config {name!r}: missing part 2 'N<negatives>' after {head!r}")
    x_inst, w_inst = _MODAL_LETTERS[m.group(1)]
    num_negatives = _parse_count(name, parts[1], 1, "N")
    kwargs: dict[str, Any] = dict(name=name, num_negatives=num_negatives, xmodal_inst_coeff=x_inst,
                                  wmodal_inst_coeff=w_inst, momentum=momentum, temperature=temperature,
                                  resample_freq=-1)
    if len(parts) > 2:
        pm = re.fullmatch(r"Pos(XW|X|W)", parts[2])
        if pm is None:
            raise ValueError(f"AVID config {name!r}: part 3 {parts[2]!r} should be Pos{{X|W|XW}}")
        if len(parts) < 5:
            raise ValueError(f"AVID config {name!r}: after {parts[2]!r} expected 'N<within negatives>-Top<k>'")
        x_pos, w_pos = _MODAL_LETTERS[pm.group(1)]
        kwargs.update(xmodal_pos_coeff=x_pos, wmodal_pos_coeff=w_pos,
                      num_negatives_within=_parse_count(name, parts[3], 3, "N"),
                      pos_k=_parse_count(name, parts[4], 4, "Top"), resample_freq=resample_freq)
        if len(parts) == 6:
            sampling = parts[5].lower()
            if sampling not in SAMPLING_TYPES:
                raise ValueError(f"AVID config {name!r}: part 6 {parts[5]!r} should be one of "
                                 f"{[s.capitalize() for s in SAMPLING_TYPES]}")
            kwargs["sampling"] = sampling
        elif len(parts) > 6:
            raise ValueError(f"AVID config {name!r}: unexpected part 7 {parts[6]!r}")
    cfg = AVIDConfig(**kwargs)
    cfg.validate()
    return cfg


# ---- memory bank -------------------------------------------------------------------------------


class MemoryBank(nn.Module):
    """Per-item embedding memory of one modality.

    Args:
        num_items: N, the training set size.
        embedding_dim: E.
        momentum: EMA momentum of :meth:`update` (official 0.5).
        generator: CPU generator for the random initialisation.

    Buffer ``memory`` (N, E): rows initialised ``normalize(randn)`` (criterions/avid.py ``init_memory``).
    """

    def __init__(self, num_items: int, embedding_dim: int, momentum: float = OFFICIAL_MOMENTUM,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2 (an item needs at least one negative), got {num_items}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("memory", F.normalize(torch.randn(num_items, embedding_dim, generator=generator), dim=1))

    @property
    def num_items(self) -> int:
        return self.memory.shape[0]

    def _check_indices(self, indices: Tensor) -> None:
        if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"indices must be a 1-D integer tensor, got shape {tuple(indices.shape)} dtype {indices.dtype}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_items):
            raise ValueError(f"indices must lie in [0, {self.num_items}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Tensor) -> None:
        """``m[i] <- normalize(momentum * m[i] + (1 - momentum) * x)`` for each (i, x).

        criterions/avid.py ``update_memory``.
        """
        self._check_indices(indices)
        if embeddings.shape != (indices.shape[0], self.memory.shape[1]):
            raise ValueError(f"embeddings must have shape ({indices.shape[0]}, {self.memory.shape[1]}), "
                             f"got {tuple(embeddings.shape)}")
        indices = indices.to(self.memory.device).long()
        old = self.memory.index_select(0, indices)
        mixed = old * self.momentum + embeddings.to(self.memory) * (1.0 - self.momentum)
        self.memory.index_copy_(0, indices, F.normalize(mixed, dim=1))

    def sample_negatives(self, indices: Tensor, num_negatives: int, generator: torch.Generator | None = None,
                         exclude: Tensor | None = None) -> Tensor:
        """Uniform negatives for each item: (B,) -> (B, num_negatives) indices.

        Without ``exclude``, every item but the item itself (criterions/avid.py ``sample_negatives``:
        draw in ``[0, N - 1)`` and shift draws ``>= y`` up by one). With ``exclude`` (B, k) *sorted*
        rows, every item outside that row (criterions/avid_cma.py ``memory_sampling``): draw a rank in
        ``[0, N - k)`` and map it to the rank-th non-excluded index.
        """
        self._check_indices(indices)
        bs, n = indices.shape[0], self.num_items
        cpu_indices = indices.detach().cpu().long()
        if exclude is None:
            draw = torch.randint(0, n - 1, (bs, num_negatives), generator=generator)
            out = draw + (draw >= cpu_indices[:, None]).long()
        else:
            excl = exclude.detach().cpu().long()
            k = excl.shape[1]
            if n - k < 1:
                raise ValueError(f"cannot draw negatives: all {n} items are excluded")
            draw = torch.randint(0, n - k, (bs, num_negatives), generator=generator)
            # With sorted exclusions e_0 < e_1 < ..., the r-th kept index is r + #{j : e_j - j <= r}.
            ref = excl - torch.arange(k)[None, :]
            out = draw + (draw[:, :, None] >= ref[:, None, :]).sum(dim=2)
        return out.to(self.memory.device)


# ---- loss --------------------------------------------------------------------------------------


def nce_loss(scores_pos: Tensor, scores_neg: Tensor, partition: Tensor | float) -> Tensor:
    """NCE loss of criterions/nce.py ``NCECriterion.forward``.

    Args:
        scores_pos: (B, P) temperature-scaled scores of the P positives.
        scores_neg: (B, K) scores of the K negatives.
        partition: Z, the noise normaliser (mean ``exp`` negative score of the first batch).

    Returns ``mean_b[ -mean_p log(e^{s_p} / (e^{s_p} + K Z)) - sum_k log(K Z / (e^{s_k} + K Z)) ]``,
    evaluated in log space (``softplus``), which is the same number without overflow.
    """
    k = scores_neg.shape[1]
    log_kz = math.log(k) + torch.log(torch.as_tensor(partition, dtype=scores_pos.dtype, device=scores_pos.device))
    neg_log_p_model = F.softplus(log_kz - scores_pos)  # -log(e^s / (e^s + KZ))
    neg_log_p_noise = F.softplus(scores_neg - log_kz)  # -log(KZ / (e^s + KZ))
    return (neg_log_p_model.mean(dim=1) + neg_log_p_noise.sum(dim=1)).mean()


def _require_embeddings(emb: Any) -> AVEmbeddings:
    if not isinstance(emb, AVEmbeddings):
        raise TypeError(f"emb must be AVEmbeddings (the AVIDModel output), got {type(emb).__name__}")
    return emb


def _scores(context: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """(B, E) x (B, M, E) -> (B, M) dot products / temperature (official ``compute_scores``)."""
    return torch.einsum("bme,be->bm", targets, context) / temperature


class AVIDCriterion(nn.Module):
    """AVID instance discrimination with memory banks and the official NCE loss.

    Args:
        config: an :class:`AVIDConfig` or an official name (``"Cross-N1024"``, ``"Joint-N1024"``...).
        num_items: training set size N (memory rows).
        embedding_dim: E.
        generator: CPU generator for memory initialisation and negative sampling (its state is saved
            in ``state_dict`` so a resumed run draws the same negatives).

    ``forward(emb, indices) -> (loss, stats)``; then call :meth:`update_memory` with the same (detached,
    all-gathered under DDP) embeddings and indices. Buffers: ``video_memory.memory``,
    ``audio_memory.memory`` (N, E) and ``partition`` (Z; -1 until the first batch).
    """

    def __init__(self, config: AVIDConfig | str, num_items: int, embedding_dim: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg = parse_avid_config(config) if isinstance(config, str) else config
        cfg.validate()
        if cfg.uses_positives and not isinstance(self, CMACriterion):
            raise ValueError(f"config {cfg.name!r} has positive-set terms: use CMACriterion")
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2, got {num_items}")
        self.config = cfg
        self.generator = generator
        # view1 = video, view2 = audio, initialised in that order as in init_memory.
        self.video_memory = MemoryBank(num_items, embedding_dim, cfg.momentum, generator)
        self.audio_memory = MemoryBank(num_items, embedding_dim, cfg.momentum, generator)
        self.register_buffer("partition", torch.tensor(-1.0))
        self._partition_ready = False  # host-side cache of "partition > 0", avoids a device sync per task
        total = cfg.xmodal_inst_coeff + cfg.wmodal_inst_coeff + cfg.xmodal_pos_coeff + cfg.wmodal_pos_coeff
        self.weights = {
            "xmodal_inst": cfg.xmodal_inst_coeff / total,
            "wmodal_inst": cfg.wmodal_inst_coeff / total,
            "xmodal_pos": cfg.xmodal_pos_coeff / total,
            "wmodal_pos": cfg.wmodal_pos_coeff / total,
        }

    @property
    def num_items(self) -> int:
        return self.video_memory.num_items

    # ---- state: keep the sampling generator's state with the memory banks ----
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator_state": self.generator.get_state() if self.generator is not None else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._partition_ready = False  # a loaded state may carry a different Z; re-read it
        if self.generator is not None and state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"])

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch hook (official ``AVID.set_epoch`` does nothing)."""

    def _check(self, emb: AVEmbeddings, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _require_embeddings(emb)
        dim = self.video_memory.memory.shape[1]
        for label, x in (("emb.visual", emb.visual), ("emb.audio", emb.audio)):
            if x.dim() != 2 or x.shape[1] != dim:
                raise ValueError(f"{label} must have shape (B, {dim}), got {tuple(x.shape)}")
        if emb.visual.shape[0] != emb.audio.shape[0] or indices.shape != (emb.visual.shape[0],):
            raise ValueError(f"indices must have shape ({emb.visual.shape[0]},) matching the batch, "
                             f"got {tuple(indices.shape)}")
        self.video_memory._check_indices(indices)
        # Scores in float32 even under autocast; the official code also renormalises here.
        video = F.normalize(emb.visual.float(), dim=1)
        audio = F.normalize(emb.audio.float(), dim=1)
        return video, audio, indices.to(self.video_memory.memory.device).long()

    def _partition(self, scores_neg: Tensor) -> Tensor:
        """Z: set once from the first batch's negatives (mean ``exp`` score, averaged over ranks), then frozen."""
        if self._partition_ready or float(self.partition) > 0:
            self._partition_ready = True
            return self.partition
        with torch.no_grad():
            batch_mean = torch.exp(scores_neg.detach()).mean()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(batch_mean)
                batch_mean = batch_mean / dist.get_world_size()
            self.partition.copy_(batch_mean)
        self._partition_ready = True
        return self.partition

    def _loss_terms(self, tasks: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        """NCE per task, pairs averaged, groups weighted (official ``AVID.forward`` / ``AVID_CMA.forward``)."""
        stats: dict[str, Tensor] = {}
        groups: dict[str, Tensor] = {}
        for key, (pos, neg) in tasks.items():
            z = self._partition(neg)  # the first task of the first batch sets Z, as NCECriterion does
            loss = nce_loss(pos, neg, z)
            stats[f"loss/{key}"] = loss.detach()
            group = key.split("/")[0]
            groups[group] = groups.get(group, 0.0) + loss / 2.0
        total = sum(self.weights[g] * l for g, l in groups.items())
        for g, l in groups.items():
            stats[f"loss/{g}"] = l.detach()
        stats["partition"] = self.partition.detach().clone()
        return total, stats  # type: ignore[return-value]

    def forward(self, emb: AVEmbeddings, indices: Tensor, negative_indices: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch.

        Args:
            emb: model output; ``visual`` / ``audio`` (B, E).
            indices: (B,) dataset indices of the batch items.
            negative_indices: optional (B, K) negatives to use instead of sampling (tests, replays).

        Returns:
            ``(loss, stats)``; stats hold detached per-task losses and the partition function Z.
        """
        # Scores of +-1/0.07 need float32: bf16 would round them by ~0.06, so autocast is off here.
        with torch.autocast(device_type=_require_embeddings(emb).visual.device.type, enabled=False):
            return self._loss(emb, indices, negative_indices)

    def _loss(self, emb: AVEmbeddings, indices: Tensor, negative_indices: Tensor | None
              ) -> tuple[Tensor, dict[str, Tensor]]:
        video, audio, idx = self._check(emb, indices)
        cfg = self.config
        with torch.no_grad():
            neg = negative_indices.to(idx.device).long() if negative_indices is not None else \
                self.video_memory.sample_negatives(idx, cfg.num_negatives, self.generator)
            v_self = self.video_memory.memory[idx][:, None]
            a_self = self.audio_memory.memory[idx][:, None]
            v_neg = self.video_memory.memory[neg]
            a_neg = self.audio_memory.memory[neg]
        t = cfg.temperature
        tasks: dict[str, tuple[Tensor, Tensor]] = {}
        if cfg.xmodal_inst_coeff > 0:
            tasks["xmodal_inst/v2a"] = (_scores(video, a_self, t), _scores(video, a_neg, t))
            tasks["xmodal_inst/a2v"] = (_scores(audio, v_self, t), _scores(audio, v_neg, t))
        if cfg.wmodal_inst_coeff > 0:
            tasks["wmodal_inst/v2v"] = (_scores(video, v_self, t), _scores(video, v_neg, t))
            tasks["wmodal_inst/a2a"] = (_scores(audio, a_self, t), _scores(audio, a_neg, t))
        return self._loss_terms(tasks)

    @torch.no_grad()
    def update_memory(self, emb: AVEmbeddings, indices: Tensor) -> None:
        """Momentum update of both banks at ``indices`` (call after the loss; no gradient)."""
        video, audio, idx = self._check(emb, indices)
        self.video_memory.update(idx, video)
        self.audio_memory.update(idx, audio)


class CMACriterion(AVIDCriterion):
    """AVID-CMA: instance discrimination plus discrimination of cross-modal-agreement positive sets.

    The positive set of item i is the ``pos_k`` other items whose memory entries are most similar to
    i's in *both* modalities (``consensus``: ``min(video_sim, audio_sim)``), recomputed from the
    memory banks by :meth:`refresh_positives` at construction and every ``resample_freq`` epochs by
    :meth:`set_epoch` (official ``AVID_CMA.set_epoch``). Buffer ``positive_set`` (N, pos_k), rows sorted.

    Loss (official ``InstX-N1024-PosW-N64-Top32``): ``0.5 * (inst_v2a + inst_a2v) / 2 +
    0.5 * (pos_v2v + pos_a2a) / 2``, where a ``pos`` term scores the embedding against its positives'
    memory in the same modality, with the first ``num_negatives_within`` negatives.
    """

    def __init__(self, config: AVIDConfig | str, num_items: int, embedding_dim: int,
                 generator: torch.Generator | None = None) -> None:
        cfg = parse_avid_config(config) if isinstance(config, str) else config
        if not cfg.uses_positives:
            raise ValueError(f"config {cfg.name!r} has no positive-set terms (need Pos..-Top<k>): use AVIDCriterion")
        if cfg.pos_k > num_items - 2:
            raise ValueError(f"pos_k ({cfg.pos_k}) must leave room for the item itself and a negative "
                             f"(num_items={num_items})")
        super().__init__(cfg, num_items, embedding_dim, generator)
        self.register_buffer("positive_set", torch.zeros(num_items, cfg.pos_k, dtype=torch.long))
        self.refresh_positives()

    @classmethod
    def from_avid(cls, avid: AVIDCriterion, config: AVIDConfig | str, generator: torch.Generator | None = None
                  ) -> CMACriterion:
        """Start CMA from a trained AVID criterion's memory banks and Z (official ``checkpoint:`` restore)."""
        n, e = avid.video_memory.memory.shape
        crit = cls(config, n, e, generator if generator is not None else avid.generator)
        crit.video_memory.memory.copy_(avid.video_memory.memory)
        crit.audio_memory.memory.copy_(avid.audio_memory.memory)
        crit.partition.copy_(avid.partition)
        crit.refresh_positives()
        return crit.to(avid.video_memory.memory.device)

    @torch.no_grad()
    def refresh_positives(self, chunk_size: int = 1024) -> Tensor:
        """Recompute ``positive_set`` from the memory banks (criterions/avid_cma.py ``CMASampler``).

        Returns the new (N, pos_k) set, each row sorted ascending.
        """
        video, audio = self.video_memory.memory, self.audio_memory.memory
        n, k = video.shape[0], self.config.pos_k
        rows = []
        for start in range(0, n, chunk_size):
            query = torch.arange(start, min(start + chunk_size, n), device=video.device)
            video_sim = video[query] @ video.T
            audio_sim = audio[query] @ audio.T
            kind = self.config.sampling
            if kind == "consensus":
                sim = torch.minimum(video_sim, audio_sim)
            elif kind == "union":
                sim = torch.maximum(video_sim, audio_sim)
            elif kind == "video":
                sim = video_sim
            else:
                sim = audio_sim
            sim[torch.arange(query.numel(), device=video.device), query] = float("-inf")  # never its own positive
            rows.append(sim.topk(k, dim=1).indices.sort(dim=1).values)
        self.positive_set.copy_(torch.cat(rows))
        return self.positive_set

    def set_epoch(self, epoch: int) -> None:
        """Official cadence: recompute positives when ``epoch > 0`` and ``epoch % resample_freq == 0``."""
        freq = self.config.resample_freq
        if freq > 0 and epoch > 0 and epoch % freq == 0:
            self.refresh_positives()

    def _loss(self, emb: AVEmbeddings, indices: Tensor, negative_indices: Tensor | None
              ) -> tuple[Tensor, dict[str, Tensor]]:
        """As :meth:`AVIDCriterion._loss`, with positive-set terms; sampled negatives avoid the positive set."""
        video, audio, idx = self._check(emb, indices)
        cfg = self.config
        with torch.no_grad():
            pos = self.positive_set[idx]
            neg = negative_indices.to(idx.device).long() if negative_indices is not None else \
                self.video_memory.sample_negatives(idx, cfg.num_negatives, self.generator, exclude=pos)
            vm, am = self.video_memory.memory, self.audio_memory.memory
            v_self, a_self = vm[idx][:, None], am[idx][:, None]
            v_pos, a_pos = vm[pos], am[pos]
            v_neg, a_neg = vm[neg], am[neg]
            kw = cfg.num_negatives_within if cfg.num_negatives_within is not None else neg.shape[1]
        t = cfg.temperature
        tasks: dict[str, tuple[Tensor, Tensor]] = {}
        if cfg.xmodal_inst_coeff > 0:
            tasks["xmodal_inst/v2a"] = (_scores(video, a_self, t), _scores(video, a_neg, t))
            tasks["xmodal_inst/a2v"] = (_scores(audio, v_self, t), _scores(audio, v_neg, t))
        if cfg.wmodal_inst_coeff > 0:
            tasks["wmodal_inst/v2v"] = (_scores(video, v_self, t), _scores(video, v_neg, t))
            tasks["wmodal_inst/a2a"] = (_scores(audio, a_self, t), _scores(audio, a_neg, t))
        if cfg.xmodal_pos_coeff > 0:
            tasks["xmodal_pos/v2a"] = (_scores(video, a_pos, t), _scores(video, a_neg, t))
            tasks["xmodal_pos/a2v"] = (_scores(audio, v_pos, t), _scores(audio, v_neg, t))
        if cfg.wmodal_pos_coeff > 0:
            tasks["wmodal_pos/v2v"] = (_scores(video, v_pos, t), _scores(video, v_neg[:, :kw], t))
            tasks["wmodal_pos/a2a"] = (_scores(audio, a_pos, t), _scores(audio, a_neg[:, :kw], t))
        return self._loss_terms(tasks)


# ---- linear probe ------------------------------------------------------------------------------


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    eval_features: Tensor,
    eval_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier trained on frozen features.

    Features are standardised with the training set's per-dimension mean and std (the effect of the
    official BatchNorm-before-linear, utils/eval_utils.py ``Classifier``), then a linear layer is
    trained full-batch with Adam (official optimiser; weight decay 0) for ``epochs`` steps from a
    ``seed``-determined initialisation. Returns top-1 accuracy on the eval set, in [0, 1].

    Shapes: train_features (N, D), train_labels (N,), eval_features (M, D), eval_labels (M,).
    """
    if train_features.dim() != 2 or eval_features.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D); got train {tuple(train_features.shape)}, "
                         f"eval {tuple(eval_features.shape)}")
    if train_features.shape[1] != eval_features.shape[1]:
        raise ValueError(f"train and eval feature dims differ: {train_features.shape[1]} vs {eval_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],) or eval_labels.shape != (eval_features.shape[0],):
        raise ValueError(f"labels must be 1-D with one label per feature row; got train {tuple(train_labels.shape)} "
                         f"for {train_features.shape[0]} rows, eval {tuple(eval_labels.shape)} "
                         f"for {eval_features.shape[0]} rows")
    if train_features.shape[0] == 0 or eval_features.shape[0] == 0:
        raise ValueError("linear probe needs at least one training and one evaluation sample")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for label, y in (("train_labels", train_labels), ("eval_labels", eval_labels)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{label} must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    x_train = train_features.detach().float().cpu()
    x_eval = eval_features.detach().float().cpu()
    y_train = train_labels.detach().long().cpu()
    y_eval = eval_labels.detach().long().cpu()
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_eval = (x_eval - mean) / std

    gen = torch.Generator().manual_seed(int(seed))
    dim = x_train.shape[1]
    bound = 1.0 / math.sqrt(dim)  # nn.Linear's default range, drawn from the seeded generator
    weight = ((torch.rand(num_classes, dim, generator=gen) * 2 - 1) * bound).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(F.linear(x_train, weight, bias), y_train).backward()
            optimizer.step()
    with torch.no_grad():
        predictions = F.linear(x_eval, weight, bias).argmax(dim=1)
    return float((predictions == y_eval).float().mean())
