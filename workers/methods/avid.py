"""AVID and AVID-CMA self-supervised pre-training (Morgado et al., CVPR 2021): instance discrimination
against per-modality memory banks with the official NCE loss, and for ``cma`` positive sets chosen by
cross-modal agreement (``models/avid_cma.py``). Evaluated every epoch by linear probes on frozen
features (Sec. 5), so there is no classifier head and no test-split protocol here.

CMA is the second stage of a two-stage schedule: the official CMA configs
(``configs/main/avid-cma/*/InstX-N1024-PosW-N64-Top32.yaml``, ``checkpoint:``) restore the trained AVID
model, and ``criterions/avid_cma.py`` (``AVID_CMA.__init__``) its memory banks and partition constant Z,
before the first positive sets are chosen. ``method.init_from`` names that AVID checkpoint; a sweep whose
CMA has none trains the AVID stage first (``start_stage``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from workers.methods.base import ENGINE_METRICS, Method, MethodSection, lazy_module, register_method

torch = lazy_module("torch")
models = lazy_module("models")
distributed = lazy_module("workers.distributed")
evaluation = lazy_module("workers.evaluation")

DEFAULT_CONFIG = {"avid": "Cross-N1024", "cma": "InstX-N1024-PosW-N64-Top32"}
# Files an avtune AVID run leaves that hold the model and the memory: the MLflow artifact of the
# final epoch and the Ray Train checkpoint.
START_FILES = ("final_model.pt", "checkpoint.pt")


class AVIDSection(MethodSection):
    """AVID / CMA self-supervised pre-training with a linear probe each epoch."""

    name: Literal["avid", "cma"] = "avid"
    config: str = Field("", description="official criterion name; empty picks Cross-N1024 (avid) or InstX-N1024-PosW-N64-Top32 (cma)")
    embedding_dim: int = Field(128, ge=8, le=2048)
    probe_epochs: int = Field(100, ge=1)
    init_from: str = Field("", description=(
        "cma: the trained AVID model to start from: the MLflow run id of a finished avid run, or the path of "
        "its checkpoints/final_model.pt (or a Ray Train checkpoint.pt / its folder). Empty: a sweep trains "
        "the AVID stage first; a single training refuses it"))
    init_from_other_experiment: bool = Field(False, exclude_if=lambda v: not v, description=(
        "cma: accept an init_from run id of another MLflow experiment than this spec's (by default refused: a run "
        "id pasted from elsewhere is more often a mistake than a plan)"))
    init_source: str = Field("", description=(
        "filled in by the orchestrator: where init_from came from (run:<id>, avid_stage:<id>, checkpoint)"))
    avid_stage_epochs: int = Field(0, ge=0, description=(
        "cma in a sweep without init_from: epochs of the AVID stage (official Kinetics: 30, then 20 of CMA); "
        "0 means train.epochs"))


def start_file(path: str) -> Path:
    """The checkpoint file `init_from` names: the file itself, or the one an avtune run left in the folder."""
    p = Path(path)
    if p.is_dir():
        for name in START_FILES:
            if (p / name).is_file():
                return p / name
        raise ValueError(f"method.init_from: {p} holds none of {', '.join(START_FILES)}")
    if not p.is_file():
        raise ValueError(f"method.init_from: no file {p} (give an AVID run id or the path of its final_model.pt)")
    return p


MEMORY_KEYS = ("video_memory.memory", "audio_memory.memory")


def check_banks(state: dict[str, Any], file: Path, clips: int, exact: bool, embedding_dim: int) -> None:
    """Both memory banks of an AVID checkpoint present, one row per training clip of this spec's data (`exact`:
    as many; else at most, when data.on_bad_media 'skip' may drop clips) and `embedding_dim` wide."""
    criterion = state["method"]["criterion"]
    missing = [key for key in (*MEMORY_KEYS, "partition") if key not in criterion]
    if missing:
        raise ValueError(f"method.init_from: {file} has no {', '.join(missing)} in its AVID criterion state: CMA "
                         "starts from the AVID stage's memory banks and Z")
    for key in MEMORY_KEYS:
        shape = tuple(criterion[key].shape)
        if len(shape) != 2 or shape[1] != embedding_dim or (shape[0] != clips if exact else shape[0] < clips):
            raise ValueError(f"method.init_from: {file}'s {key} is {shape} (clips x embedding_dim), but this spec "
                             f"trains on {clips} clips (data) with method.embedding_dim {embedding_dim}: CMA continues "
                             "on the AVID stage's training set and embedding size")


def load_avid_start(path: str) -> dict[str, Any]:
    """The AVID model and criterion state saved at `path`; a clear error when it is not an AVID checkpoint."""
    file = start_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"method.init_from: {file} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    kind = state.get("method_name") if isinstance(state, dict) else None
    criterion = (state.get("method") or {}).get("criterion") if isinstance(state, dict) else None
    if kind != "avid" or not criterion or "model" not in state:
        what = f"a {kind!r} checkpoint" if kind else "not an avtune checkpoint with a method name"
        raise ValueError(f"method.init_from: {file} is {what}, not an AVID one with its memory banks "
                         f"(CMA starts from the model, memory and Z of a trained avid run)")
    return state


def negatives_problems(spec, negatives: int, config: str) -> list[str]:
    """The negatives a step draws per clip must exist (no more than the clips: generated data says how many
    before it exists; a dataset's training split is counted before the run starts, `check_data`) and fit in
    memory (the global batch x negatives x embedding_dim scores of each modality pair)."""
    from workers.specs import MAX_BATCH_BYTES

    problems = []
    synth = spec.data.synth
    if spec.data.source == "generated" and negatives >= synth.classes * synth.clips_per_class:
        problems.append(f"method.config {config}: {negatives:,} negatives per clip, but data.synth makes only "
                        f"{synth.classes * synth.clips_per_class} clips (classes x clips_per_class)")
    size = spec.global_batch * negatives * spec.method.embedding_dim * 4 * 2
    if size > MAX_BATCH_BYTES:
        problems.append(f"method.config {config}: {negatives:,} negatives x method.embedding_dim {spec.method.embedding_dim} x "
                        f"a batch of {spec.global_batch} clips is {size / 1e9:.3g} GB per step, more than "
                        f"{MAX_BATCH_BYTES / 1e9:.3g} GB")
    return problems


@register_method
class AVID(Method):
    Section = AVIDSection
    self_supervised = True
    run_param_keys = ("cma_init_from",)

    @classmethod
    def start_stage(cls, section: AVIDSection) -> dict[str, Any] | None:
        if section.name != "cma" or section.init_from:
            return None
        # The AVID stage discriminates against as many negatives as the CMA stage (Cross-N1024 -> InstX-N1024-...).
        negatives = models.parse_avid_config(section.config or DEFAULT_CONFIG["cma"]).num_negatives
        return {"name": "avid", "config": f"Cross-N{negatives}", "embedding_dim": section.embedding_dim,
                "probe_epochs": section.probe_epochs}

    @classmethod
    def start_stage_epochs(cls, section: AVIDSection) -> int:
        return section.avid_stage_epochs

    @classmethod
    def epoch_metrics(cls, spec) -> frozenset[str]:
        # Linear probes on frozen features (evaluate) and end_epoch's loss and gap: no heads' losses, no
        # Shapley values, no training-split loss.
        return ENGINE_METRICS | {"acc", "acc_audio", "acc_visual", "loss", "gap_av"}

    @classmethod
    def check_start(cls, path: str, spec) -> None:
        from workers.datasets import load_records

        state = load_avid_start(path)
        data = spec.data
        records, _ = load_records(data.root, data.layout, "train", skipped=[] if data.on_bad_media == "skip" else None)
        check_banks(state, start_file(path), len(records), data.on_bad_media == "error", spec.method.embedding_dim)

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        m = spec.method
        if m.name != "cma":
            return {}
        return {"cma_init_from": m.init_source or f"checkpoint:{m.init_from}"}

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        m = spec.method
        problems = []
        if m.name == "avid" and (m.init_from or m.init_source or m.avid_stage_epochs):
            problems.append("method.init_from / init_source / avid_stage_epochs: only cma starts from a trained AVID model")
        if not m.config:  # the official default criterion draws its negatives too
            default = DEFAULT_CONFIG[m.name]
            problems += negatives_problems(spec, models.parse_avid_config(default).num_negatives, f"(default {default})")
        if m.config:
            try:  # a typo'd official name is found here, not when a trial builds its criterion
                config = models.parse_avid_config(m.config)
                config.validate()
            except ValueError as err:
                problems.append(f"method.config: {err}")
            else:
                problems += negatives_problems(spec, config.num_negatives, m.config)
                if config.uses_positives != (m.name == "cma"):
                    problems.append(f"method.config: {m.config!r} is a{' CMA' if config.uses_positives else 'n AVID'} "
                                    f"criterion; method {m.name} needs {'an InstX-...-Pos' if m.name == 'cma' else 'a Cross-/Joint-'} name")
        return problems

    def build_model(self, num_classes: int):
        m = self.spec.model
        return models.build_avid_model(embedding_dim=self.config.embedding_dim, audio_arch=m.audio_arch,
                                       visual_arch=m.visual_arch, width=m.width)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        self.num_classes = datasets["train"].num_classes
        config = models.parse_avid_config(self.config.config or DEFAULT_CONFIG[self.config.name])
        generator = torch.Generator().manual_seed(self.spec.train.seed)
        if self.config.name == "avid":
            self.criterion = models.AVIDCriterion(config, num_items=len(datasets["train"]),
                                                  embedding_dim=self.config.embedding_dim, generator=generator)
        else:
            self.criterion = self._start_cma(model, config, len(datasets["train"]), generator)
        self.criterion.to(self.runtime.device)

    def _start_cma(self, model, config, num_items: int, generator):
        """Official CMA start: the AVID model's weights, its memory banks and Z; positives chosen from that memory."""
        if not self.config.init_from:
            raise ValueError("method.init_from: cma starts from a trained AVID model; give an avid run id or checkpoint")
        start = load_avid_start(self.config.init_from)
        memory = start["method"]["criterion"]["video_memory.memory"]
        if tuple(memory.shape) != (num_items, self.config.embedding_dim):
            raise ValueError(f"method.init_from: the AVID memory bank is {tuple(memory.shape)} (clips x embedding_dim) "
                             f"but this run has {num_items} training clips and embedding_dim {self.config.embedding_dim}: "
                             "CMA continues on the AVID stage's training set and embedding size")
        try:
            model.load_state_dict(start["model"])
        except RuntimeError as err:
            raise ValueError("method.init_from: the AVID model does not fit this spec's model (model.audio_arch, "
                             f"visual_arch, width and method.embedding_dim must be the AVID run's): {str(err).splitlines()[0]}") from None
        avid = models.AVIDCriterion(f"Cross-N{config.num_negatives}", num_items=num_items,
                                    embedding_dim=self.config.embedding_dim)
        avid.load_state_dict(start["method"]["criterion"])
        return models.CMACriterion.from_avid(avid, config, generator=generator)

    def start_epoch(self, epoch: int) -> None:
        # CMA resamples its positive sets every `resample_freq` epochs (official train loop's set_epoch);
        # a no-op for AVID.
        self.criterion.set_epoch(epoch)

    def loss(self, out, batch, sums):
        return self.criterion(out, batch.index)[0]

    def after_step(self, out, batch) -> None:
        # Every rank updates its memory with the whole global batch, so the banks stay identical.
        with torch.no_grad():
            gathered = type(out)(*(distributed.all_gather_cat(x.detach()) for x in out))
            self.criterion.update_memory(gathered, distributed.all_gather_cat(batch.index))

    def evaluate(self, loaders, autocast) -> dict[str, float]:
        return evaluation.evaluate_linear_probes(self.model, loaders["train_eval"], loaders["val"], self.runtime.device,
                                                 self.num_classes, self.config.probe_epochs, self.spec.train.seed)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["loss"] = metrics["loss_train"]
        metrics["gap_av"] = metrics["acc_audio"] - metrics["acc_visual"]

    def test_metrics(self, loaders, autocast) -> dict[str, float]:
        return {}

    def predictions(self, loaders, split, which, autocast) -> list:
        return []

    def state_dict(self):
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state) -> None:
        self.criterion.load_state_dict(state["criterion"])
