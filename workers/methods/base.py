"""The method registry and the contract between a balancing method and the training engine.

A method is one class, registered by name (the pattern of timm's ``register_model``), that owns

* its spec section: a pydantic model for the ``method:`` block (``Section``), whose ``name`` field is a
  ``Literal`` of the names it answers to (OGM's section serves ``ogm`` and ``ogm_ge``);
* the hooks :func:`workers.engine.fit` calls: build the model, the loss of a batch, after backward,
  after the optimiser step, evaluation, end of epoch, and its own checkpoint state;
* what a sweep and the report need to know (``modality``, ``label_fields``, ``needs_estimation``).

Method files import no torch at module level (``lazy_module``), so the spec, which derives its
``method`` union from this registry, loads without torch: the driver validates specs fast and the
worker validates the spec it receives into the same pydantic model.
"""
from __future__ import annotations

import importlib
import re
import typing
from collections import defaultdict
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

_REGISTRY: dict[str, type["Method"]] = {}
# What the engine adds to every epoch's metrics, whatever the method (workers.engine.train_epochs).
ENGINE_METRICS = frozenset({"lr", "loss_train", "best_acc", "best_epoch", "epoch_seconds", "train_seconds"})


class lazy_module:
    """A module imported on first attribute access: method files name torch and models this way, so
    importing them (and the spec that collects their sections) loads neither. A plain proxy, not a
    `sys.modules` entry, so nothing that scans `sys.modules` (inspect, pickle) triggers the import."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = lazy_module("torch")
evaluation = lazy_module("workers.evaluation")


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields are errors naming the field path."""

    # NaN and infinity are never a setting (`learning_rate: .nan` would pass `le=10` checks).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MethodSection(StrictModel):
    """Base of every method's spec section (the ``method:`` block)."""

    name: str


class Method:
    """One balancing method. Subclasses set ``Section`` and override the hooks they need.

    The defaults describe plain supervised joint training: cross-entropy on the joint logits (plus
    the detached probe heads where the model has them), classifier evaluation with Shapley values,
    test numbers of the best-validation model at the end.
    """

    Section: ClassVar[type[MethodSection]]
    # "audio" / "visual" for a uni-modal baseline; None for a joint model.
    modality: ClassVar[str | None] = None
    # Section fields that tell two trials of this method apart in the report (OGM: alpha and the window;
    # the report treats a method labelled by "alpha" as an OGM variant).
    label_fields: ClassVar[tuple[str, ...]] = ()
    # True: per-epoch metrics come from linear probes on frozen features, not classifier heads.
    self_supervised: ClassVar[bool] = False
    # Keys of `run_params`: derived params, which never label a trial's configuration in the report.
    run_param_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Any, runtime: Any) -> None:
        self.spec = spec
        self.config = spec.method
        self.runtime = runtime

    # ---- what a sweep needs to know (class level: no model, no data) ----

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return typing.get_args(cls.Section.model_fields["name"].annotation)

    @classmethod
    def needs_estimation(cls, section: MethodSection) -> bool:
        """Whether a sweep must run an estimation stage first (G-Blend's offline weights)."""
        return False

    @classmethod
    def start_stage(cls, section: MethodSection) -> dict[str, Any] | None:
        """The method section of a stage a sweep trains first because this run starts from a trained
        model and the section names none (CMA from AVID); None when nothing has to run first. The
        orchestrator fills the section's ``init_from`` (the stage's final checkpoint) and ``init_source``."""
        return None

    @classmethod
    def start_stage_epochs(cls, section: MethodSection) -> int:
        """Epochs of the start stage; 0 means ``train.epochs``."""
        return 0

    @classmethod
    def check_start(cls, path: str, spec: Any) -> None:
        """Raise ValueError, naming the field, when the file ``init_from`` names cannot start this method on
        ``spec`` (its data resolved: called before the run exists)."""

    @classmethod
    def run_label(cls, section: MethodSection) -> list[str]:
        """Short parts of a run name that say which settings of this method ran."""
        return []

    @classmethod
    def run_params(cls, spec: Any) -> dict[str, str]:
        """Params logged on the run beside the spec's own: how this method ran where the spec alone
        does not say (e.g. which scores OGM used), so runs are never compared unknowingly."""
        return {}

    @classmethod
    def epoch_metrics(cls, spec: Any) -> frozenset[str]:
        """The metrics every epoch of a run of ``spec`` with this method reports. A sweep's
        ``search.metric`` must be one of them for every swept method: Tune's scheduler and searcher stop
        the whole sweep at the first result without it, after trials have trained
        (``tests/test_engine.py`` checks each method's declaration against what its epochs report).
        The default: the engine's own metrics and ``evaluate``'s (loss and accuracy of each head the
        model has; a joint model's gap and Shapley values; the training split's loss when measured)."""
        heads = ("audio", "visual") if cls.modality is None else (cls.modality,)
        names = {"acc", "loss", *(f"{k}_{h}" for k in ("acc", "loss") for h in heads)}
        if cls.modality is None:
            names |= {"gap_av", "shapley_audio", "shapley_visual"}
        if spec.train.train_split_loss:
            names |= {"loss_train_eval", *(f"loss_train_eval_{h}" for h in heads)}
        return frozenset(names | ENGINE_METRICS)

    @classmethod
    def spec_problems(cls, spec: Any) -> list[str]:
        """Checks that need other sections of the spec (e.g. epochs, frames); one text per problem."""
        return []

    def evaluation_batch_size(self) -> int | None:
        """Clips per evaluation batch; None: the engine's default, the global training batch (what every
        official code evaluates with; a classifier in eval mode gives the same outputs for any batch)."""
        return None

    # ---- hooks the engine calls, in the order it calls them ----

    def build_model(self, num_classes: int):
        raise NotImplementedError

    def setup(self, model, datasets: dict[str, Any]) -> None:
        """After the model is built and wrapped: ``model`` is the unwrapped module."""
        self.model = model

    def start_epoch(self, epoch: int) -> None:
        pass

    def train_step(self, model, optimizer, batch, epoch: int, step: int, sums: defaultdict, autocast):
        """One optimisation step on ``batch``; returns the loss it logs as ``loss_train``. ``model`` is the
        (possibly DDP-wrapped) model, ``self.model`` the module under it. The default is the step most
        methods share; a method whose step differs in kind (several backward passes, alternating
        modalities) overrides this and keeps the other hooks."""
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(batch.audio, batch.visual)
            loss = self.loss(out, batch, sums)
        loss.backward()
        self.after_backward(out, batch, epoch, step, sums)
        optimizer.step()
        self.after_step(out, batch)
        return loss

    def loss(self, out, batch, sums: defaultdict):
        F = torch.nn.functional
        loss = F.cross_entropy(out.logits, batch.labels)
        if getattr(self.model, "has_probe_heads", False):  # probe heads see detached features: this trains only them
            loss = loss + F.cross_entropy(out.logits_audio, batch.labels) + F.cross_entropy(out.logits_visual, batch.labels)
        return loss

    def after_backward(self, out, batch, epoch: int, step: int, sums: defaultdict) -> None:
        pass

    def after_step(self, out, batch) -> None:
        pass

    def evaluate(self, loaders: dict[str, Any], autocast) -> dict[str, float]:
        metrics = evaluation.evaluate_classifier(self.model, loaders["val"], self.runtime.device, autocast,
                                                 shapley=self.modality is None)
        if self.spec.train.train_split_loss:
            metrics.update(self.train_split_losses(loaders, autocast))
        return metrics

    def train_split_losses(self, loaders: dict[str, Any], autocast) -> dict[str, float]:
        """Each head's loss of the model as it is now on the whole training split, in eval mode:
        ``loss_train_eval`` (joint), ``_audio``, ``_visual``. Unlike ``loss_train`` (the mean of the
        mini-batch losses while the weights moved, in train mode) this is the training loss of *this*
        model, what G-Blend's overfitting term O_N = L^V_N - L^T_N compares (Wang et al., Sec. 3.2)."""
        train = evaluation.evaluate_classifier(self.model, loaders["train_eval"], self.runtime.device, autocast)
        return {k.replace("loss", "loss_train_eval", 1): v for k, v in train.items() if k.startswith("loss")}

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """May add metrics of its own to ``metrics`` (e.g. G-Blend's weights)."""

    def test_metrics(self, loaders: dict[str, Any], autocast) -> dict[str, float]:
        """Held-out numbers of the model in ``self.model`` (the engine loads the best-on-validation
        weights first); {} where the method has no test protocol."""
        return evaluation.evaluate_classifier(self.model, loaders["test"], self.runtime.device, autocast)

    def predictions(self, loaders: dict[str, Any], split: str, which: str, autocast) -> list[dict[str, Any]]:
        """Per-clip predictions of the model in ``self.model`` on ``split`` (see
        ``workers.evaluation.predict``); [] where the method has no classifier."""
        return evaluation.predict(self.model, loaders[split], self.runtime.device, autocast, split, which)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def is_run_id(text: str) -> bool:
    """An MLflow run id (32 hex digits), as a start point names a run."""
    return re.fullmatch(r"[0-9a-f]{32}", text) is not None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under every name its section's ``name`` allows."""
    for name in cls.names():
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r} (registered: {', '.join(method_names())})") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def method_sections() -> tuple[type[MethodSection], ...]:
    return tuple(dict.fromkeys(cls.Section for cls in _REGISTRY.values()))


def unimodal_methods() -> dict[str, str]:
    """modality -> name of its uni-modal baseline method."""
    return {cls.modality: name for name, cls in _REGISTRY.items() if cls.modality}


def run_param_keys() -> frozenset[str]:
    """Every registered method's derived run-param keys (`Method.run_param_keys`)."""
    return frozenset(k for cls in _REGISTRY.values() for k in cls.run_param_keys)
