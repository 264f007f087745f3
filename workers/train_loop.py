"""The training loop that runs inside every Ray Train worker.

One function, `train_loop_per_worker`, read top to bottom: data, model, optimiser, resume, then
per epoch the method's step, validation, and one `ray.train.report` with a checkpoint. It receives
the validated spec as plain data (`ExperimentSpec.model_dump(mode="json")`): workers never import
the orchestrator. MLflow is not touched here; the driver-side callback logs what we report.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import ray.train
import ray.train.torch

from models import (
    build_av_classifier,
    build_avid_model,
    build_avslowfast,
    build_gblend_classifier,
    build_unimodal_classifier,
    blended_loss,
    estimate_blend_weights,
    in_modulation_window,
    linear_probe_accuracy,
    modulate_gradients,
    ogm_coefficients_from_scores,
    modality_scores,
)
from models.avid_cma import AVIDCriterion, CMACriterion, parse_avid_config
from workers.datasets import AVClipDataset, DecodeParams

CHECKPOINT_FILE = "state.pt"
OGM_METHODS = ("ogm", "ogm_ge")
AVID_METHODS = ("avid", "cma")
DEFAULT_AVID_CONFIG = {"avid": "Cross-N1024", "cma": "InstX-N1024-PosW-N64-Top32"}


# ---- building blocks -------------------------------------------------------------------


def build_datasets(spec: dict[str, Any]) -> dict[str, AVClipDataset]:
    data = spec["data"]
    root = Path(data["root"])
    cache_dir = None
    if data["cache"]:
        cache_dir = Path(data["cache_dir"]) if data.get("cache_dir") else root / ".avtune-cache"
    decode = DecodeParams(**data["decode"])
    out: dict[str, AVClipDataset] = {}
    class_names = None
    for split in ("train", "val", "test"):
        ds = AVClipDataset(
            root, data["layout"], split, decode, cache_dir=cache_dir,
            on_bad_media=data["on_bad_media"], class_names=class_names,
        )
        class_names = ds.class_names
        out[split] = ds
    return out


def build_model(spec: dict[str, Any], num_classes: int) -> nn.Module:
    m, method = spec["model"], spec["method"]
    name = method["name"]
    common = dict(audio_arch=m["audio_arch"], visual_arch=m["visual_arch"], width=m["width"])
    if name in ("normal", *OGM_METHODS):
        return build_av_classifier(num_classes, fusion=m["fusion"], **common)
    if name == "gblend":
        return build_gblend_classifier(num_classes, **common)
    if name == "audio_only":
        return build_unimodal_classifier("audio", num_classes, arch=m["audio_arch"], width=m["width"])
    if name == "visual_only":
        return build_unimodal_classifier("visual", num_classes, arch=m["visual_arch"], width=m["width"])
    if name == "avslowfast":
        return build_avslowfast(num_classes, config=method["config"], drop_pathway_rate=method["drop_pathway_rate"])
    if name in AVID_METHODS:
        return build_avid_model(embedding_dim=method["embedding_dim"], **common)
    raise ValueError(f"method.name: unknown method {name!r}")


def build_optimizer(spec: dict[str, Any], params) -> torch.optim.Optimizer:
    t = spec["train"]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=t["learning_rate"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    return torch.optim.Adam(params, lr=t["learning_rate"], weight_decay=t["weight_decay"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ---- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device, autocast,
                        shapley: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the joint and per-modality logits over a whole split.

    With `shapley`, also the joint accuracy with a modality *masked* and each modality's Shapley
    value of the joint accuracy (two players). Masking replaces that modality's input with zeros:
    a silent log-mel / a frame at the dataset mean after normalisation, i.e. no information,
    through the same network. phi_a = 1/2 [(v(a) - v(0)) + (v(av) - v(v))], and likewise phi_v,
    so phi_a + phi_v = v(av) - v(0).
    """
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for audio, visual, labels, _ in loader:
        audio, visual, labels = audio.to(device), visual.to(device), labels.to(device)
        with autocast():
            out = model(audio, visual)
        n += labels.numel()
        for suffix, logits in (("", out.logits), ("_audio", out.logits_audio), ("_visual", out.logits_visual)):
            if logits is None:
                continue
            logits = logits.float()
            sums["acc" + suffix] += (logits.argmax(1) == labels).sum().item()
            sums["loss" + suffix] += F.cross_entropy(logits, labels, reduction="sum").item()
        if shapley:
            for key, a, v in (("acc_mask_audio", torch.zeros_like(audio), visual),
                              ("acc_mask_visual", audio, torch.zeros_like(visual)),
                              ("acc_mask_both", torch.zeros_like(audio), torch.zeros_like(visual))):
                with autocast():
                    sums[key] += (model(a, v).logits.float().argmax(1) == labels).sum().item()
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
    if shapley:
        v_av, v_0 = metrics["acc"], metrics["acc_mask_both"]
        v_a, v_v = metrics["acc_mask_visual"], metrics["acc_mask_audio"]  # audio alone = visual masked
        metrics["shapley_audio"] = 0.5 * ((v_a - v_0) + (v_av - v_v))
        metrics["shapley_visual"] = 0.5 * ((v_v - v_0) + (v_av - v_a))
    if "acc_audio" in metrics and "acc_visual" in metrics:
        metrics["gap_av"] = metrics["acc_audio"] - metrics["acc_visual"]
    return metrics


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    fa, fv, ys = [], [], []
    for audio, visual, labels, _ in loader:
        emb = model(audio.to(device), visual.to(device))
        fa.append(emb.features_audio.float().cpu())
        fv.append(emb.features_visual.float().cpu())
        ys.append(labels)
    return torch.cat(fa), torch.cat(fv), torch.cat(ys)


def evaluate_linear_probes(model, train_loader, val_loader, device, num_classes, probe_epochs, seed) -> dict[str, float]:
    """AVID/CMA evaluation: linear probes on frozen encoder features (Morgado et al., Sec. 5)."""
    tra, trv, try_ = extract_features(model, train_loader, device)
    vaa, vav, vay = extract_features(model, val_loader, device)
    probe = lambda tr, va: linear_probe_accuracy(tr, try_, va, vay, num_classes, epochs=probe_epochs, seed=seed)
    return {
        "acc_audio": probe(tra, vaa),
        "acc_visual": probe(trv, vav),
        "acc": probe(torch.cat([tra, trv], 1), torch.cat([vaa, vav], 1)),
    }


# ---- the loop ----------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec: dict[str, Any] = config["spec"]
    t, method = spec["train"], spec["method"]
    name = method["name"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Each worker gets cpus_per_worker cores from Ray; more torch threads would oversubscribe them.
    torch.set_num_threads(max(1, int(spec["scaling"]["cpus_per_worker"])))
    seed_everything(t["seed"])
    device = ray.train.torch.get_device()

    datasets = build_datasets(spec)
    num_classes = datasets["train"].num_classes
    loader_kw = dict(num_workers=spec["data"]["loader_workers"], pin_memory=device.type == "cuda")
    train_loader = ray.train.torch.prepare_data_loader(
        # drop_last: a trailing batch of one breaks BatchNorm (AVSlowFast's audio lateral sees B x 1 slow frame).
        DataLoader(datasets["train"], batch_size=t["batch_size"], shuffle=True,
                   drop_last=len(datasets["train"]) > t["batch_size"], **loader_kw)
    )
    # Every rank evaluates the whole (small) held-out split: identical numbers on every rank,
    # no sampler padding skewing accuracy. Model selection uses `val`; `test` is only reported.
    eval_loader = lambda split: DataLoader(datasets[split], batch_size=t["batch_size"] * 2, shuffle=False, **loader_kw)
    val_loader, plain_train_loader = eval_loader("val"), eval_loader("train")

    model = build_model(spec, num_classes)
    if t["channels_last"] and device.type == "cuda":
        # AVSlowFast mixes 4-D (audio) and 5-D (video) convs and converts each itself.
        model = model.to_channels_last() if hasattr(model, "to_channels_last") else model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw = unwrap(model)

    criterion = None
    if name in AVID_METHODS:
        avid_cfg = parse_avid_config(method["config"] or DEFAULT_AVID_CONFIG[name])
        crit_cls = CMACriterion if name == "cma" else AVIDCriterion
        criterion = crit_cls(avid_cfg, num_items=len(datasets["train"]), embedding_dim=method["embedding_dim"],
                             generator=torch.Generator().manual_seed(t["seed"])).to(device)

    optimizer = build_optimizer(spec, [p for p in raw.parameters() if p.requires_grad])
    # StepLR every lr_decay_step epochs by lr_decay_ratio (OGM-GE main.py: StepLR(70, 0.1)).
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, t["lr_decay_step"], t["lr_decay_ratio"])
    use_bf16 = t["bf16_autocast"] and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    gblend = {"weights": {"audio": 1 / 3, "visual": 1 / 3, "joint": 1 / 3}, "measurements": []}
    if name == "gblend" and isinstance(method["weights"], dict):
        total = sum(method["weights"].values())
        gblend["weights"] = {k: v / total for k, v in method["weights"].items()}

    start_epoch, best, history = 0, {"acc": -1.0, "epoch": -1, "state": None}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state_file = Path(ckpt_dir) / CHECKPOINT_FILE
            try:
                state = torch.load(state_file, map_location="cpu", weights_only=True)
            except Exception as err:
                # A registered checkpoint always holds a complete state.pt (written, then renamed,
                # before the report), so this is damage on disk or a foreign file: stop and name it
                # rather than train on from scratch or from whatever could be read.
                # The path goes last: Ray Train keeps the tail of a worker's error.
                raise RuntimeError(f"checkpoint cannot be loaded ({type(err).__name__}): truncated, corrupt, or holding "
                                   f"objects other than tensors and plain data, which weights_only refuses: {state_file}") from err
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if criterion is not None:
            criterion.load_state_dict(state["criterion"])
        gblend, best, history = state["gblend"], state["best"], state["history"]
        restore_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1

    for epoch in range(start_epoch, t["epochs"]):
        started = time.perf_counter()
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        if criterion is not None:
            # CMA resamples its positive sets every `resample_freq` epochs (official train loop's set_epoch);
            # a no-op for AVID. From scratch, the first sets come from the random initial memory.
            criterion.set_epoch(epoch)
        model.train()
        modulate = name in OGM_METHODS and in_modulation_window(epoch, method["modulation_starts"], method["modulation_ends"])
        sums: dict[str, torch.Tensor] = defaultdict(float)  # running sums kept on the device
        steps = 0
        for step, (audio, visual, labels, index) in enumerate(train_loader):
            audio, visual, labels = audio.to(device), visual.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                out = model(audio, visual)
                if criterion is not None:
                    loss, _ = criterion(out, index.to(device))
                elif name == "gblend":
                    loss = blended_loss(out, labels, gblend["weights"])
                else:
                    loss = F.cross_entropy(out.logits, labels)
                    if raw.has_probe_heads:  # probe heads see detached features: this trains only them
                        loss = loss + F.cross_entropy(out.logits_audio, labels) + F.cross_entropy(out.logits_visual, labels)
            loss.backward()
            if name in OGM_METHODS:
                # Scores are summed over the *global* batch (OGM-GE main.py sums over its batch), so every
                # rank computes the same coefficients and DDP replicas stay identical.
                scores = all_reduce_sum(torch.stack(modality_scores(out.logits_audio.float(), out.logits_visual.float(), labels)).detach())
                coeffs = ogm_coefficients_from_scores(scores[0], scores[1], method["alpha"])
                if modulate:
                    # Same seed on every rank: identical GE noise keeps replicas in sync.
                    noise_gen = torch.Generator(device=device).manual_seed(t["seed"] * 1_000_003 + epoch * 100_003 + step)
                    modulate_gradients(raw.audio_encoder, raw.visual_encoder, coeffs,
                                       gaussian_enhance=name == "ogm_ge", generator=noise_gen)
                sums["k_audio"] += coeffs.k_audio
                sums["k_visual"] += coeffs.k_visual
                sums["ratio_av"] += coeffs.ratio_av
            optimizer.step()
            if criterion is not None:
                with torch.no_grad():
                    criterion.update_memory(type(out)(*(all_gather_cat(x.detach()) for x in out)), all_gather_cat(index.to(device)))
            sums["loss_train"] += loss.detach().float()
            if name == "gblend":
                with torch.no_grad():
                    for head, logits in (("audio", out.logits_audio), ("visual", out.logits_visual), ("joint", out.logits)):
                        sums[f"loss_train_{head}"] += F.cross_entropy(logits.float(), labels)
            steps += 1
        scheduler.step()
        train_seconds = time.perf_counter() - started

        metrics: dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        # One device->host copy per epoch, not one `.item()` sync per step (a stall per step on CUDA).
        metrics.update({k: float(v) / max(steps, 1) for k, v in sums.items()})
        # Mean training loss over all ranks: each rank saw a different shard.
        metrics["loss_train"] = all_reduce_sum(torch.tensor([metrics["loss_train"]])).item() / world
        if name in OGM_METHODS:
            metrics["modulation_active"] = float(modulate)
        if criterion is not None:
            metrics["loss"] = metrics["loss_train"]
            metrics.update(evaluate_linear_probes(raw, plain_train_loader, val_loader, device, num_classes,
                                                  method["probe_epochs"], t["seed"]))
            metrics["gap_av"] = metrics["acc_audio"] - metrics["acc_visual"]
        else:
            multimodal = name not in ("audio_only", "visual_only")
            metrics.update(evaluate_classifier(raw, val_loader, device, autocast, shapley=multimodal))

        if name == "gblend":
            per_head = {h: (metrics[f"loss_train_{h}"], metrics["loss" if h == "joint" else f"loss_{h}"])
                        for h in ("audio", "visual", "joint")}
            if method["mode"] == "online" and (epoch + 1) % method["estimate_window_epochs"] == 0:
                # Online G-Blend (Wang et al., Alg. 2): re-estimate at the end of every super-epoch
                # from this and the previous super-epoch's train/val losses of each head.
                gblend["measurements"] = (gblend["measurements"] + [per_head])[-2:]
                if len(gblend["measurements"]) == 2:
                    gblend["weights"] = estimate_blend_weights(*gblend["measurements"])
            metrics.update({f"gblend_w_{h}": w for h, w in gblend["weights"].items()})

        if metrics["acc"] > best["acc"]:
            best = {"acc": metrics["acc"], "epoch": epoch, "state": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}}
        metrics["best_acc"], metrics["best_epoch"] = best["acc"], best["epoch"]
        metrics["epoch_seconds"] = time.perf_counter() - started
        metrics["train_seconds"] = train_seconds

        if epoch == t["epochs"] - 1 and criterion is None:
            # Held-out test numbers of the model chosen on validation; never used for selection.
            current = {k: v.detach().clone() for k, v in raw.state_dict().items()}
            raw.load_state_dict(best["state"])
            test = evaluate_classifier(raw, eval_loader("test"), device, autocast)
            raw.load_state_dict(current)
            metrics.update({f"test_{k}": v for k, v in test.items()})

        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {
                    "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "criterion": criterion.state_dict() if criterion is not None else {}, "epoch": epoch,
                    "gblend": gblend, "best": best, "rng": rng_state(), "num_classes": num_classes,
                    "history": history,
                    "class_names": list(datasets["train"].class_names),
                }
                # Written under a temporary name then renamed, so a kill mid-write never leaves a
                # file named state.pt that could be loaded half-written.
                torch.save(state, Path(tmp) / (CHECKPOINT_FILE + ".partial"))
                os.replace(Path(tmp) / (CHECKPOINT_FILE + ".partial"), Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
