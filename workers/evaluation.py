"""Evaluation on a whole held-out split: classifier accuracies (joint, per head, Shapley values of the
two modalities) and, for self-supervised methods, linear probes on frozen features."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models import linear_probe_accuracy


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


PREDICTION_COLUMNS = ("split", "model", "clip_id", "label", "pred", "pred_audio", "pred_visual",
                      "p_true", "p_true_audio", "p_true_visual")
# Each `predict` row also carries the joint head's whole softmax under this key, until
# `pack_probabilities` moves them into one array (a late-fusion ensemble needs every class, not p_true).
PROBS_KEY = "probs"


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, autocast, split: str,
            which: str) -> list[dict[str, object]]:
    """One row per clip of the loader's split: its id and label, the predicted class of the joint,
    audio and visual heads and each head's softmax probability of the true class (columns
    ``PREDICTION_COLUMNS``; a head the model lacks gives -1 / nan), plus ``PROBS_KEY``: the softmax of the
    model's ``logits`` over every class (the joint head; a uni-modal model's one classifier). `which` names
    the model ("final": the last epoch's, as ``acc``; "selected": the best on validation, as ``test_acc``).
    Any comparison of two runs on the same clips can be recomputed from these rows alone."""
    model.eval()
    records = loader.dataset.records
    rows: list[dict[str, object]] = []
    for audio, visual, labels, index in loader:
        with autocast():
            out = model(audio.to(device), visual.to(device))
        labels = labels.to(device)
        heads = {}
        for suffix, logits in (("", out.logits), ("_audio", out.logits_audio), ("_visual", out.logits_visual)):
            if logits is None:
                continue
            probs = logits.float().softmax(1)
            heads[suffix] = (probs.argmax(1).tolist(), probs.gather(1, labels[:, None])[:, 0].tolist())
        joint = out.logits.float().softmax(1).cpu().tolist() if out.logits is not None else None
        for i, (idx, label) in enumerate(zip(index.tolist(), labels.tolist())):
            row: dict[str, object] = {"split": split, "model": which, "clip_id": records[idx].clip_id, "label": label}
            if joint is not None:
                row[PROBS_KEY] = joint[i]
            for suffix in ("", "_audio", "_visual"):
                pred, p_true = heads.get(suffix, (None, None))
                row[f"pred{suffix}"] = pred[i] if pred is not None else -1
                row[f"p_true{suffix}"] = p_true[i] if p_true is not None else float("nan")
            rows.append(row)
    return rows


def pack_probabilities(rows: list[dict[str, object]]) -> dict[str, object] | None:
    """Moves each row's ``PROBS_KEY`` out of `rows` (in place) into one compact record: ``clip_id``,
    ``split``, ``model`` (lists, row order) and ``probs``, a float16 (rows, classes) tensor: half the bytes
    of float32. float16 resolves about 1e-3 near 1, so two classes closer than that may swap in an argmax;
    the report scores the ensemble on these stored values, so it is reproducible from the artifacts alone.
    None when no row carries probabilities (a method without a classifier)."""
    carrying = [row for row in rows if PROBS_KEY in row]
    if not carrying:
        return None
    probs = torch.tensor([row.pop(PROBS_KEY) for row in carrying], dtype=torch.float16)
    return {key: [row[key] for row in carrying] for key in ("clip_id", "split", "model")} | {"probs": probs}


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
