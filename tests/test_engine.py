"""Every registered method through the Ray-free engine, in-process, on generated mp4 clips: per-epoch
metrics, the checkpoint state through torch.save / torch.load(weights_only=True), and a resume that
continues exactly where an undisturbed run goes. Ray Train runs the same `fit` (tests/test_training.py)."""
from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.engine import fit
from workers.methods import get_method, method_names
from workers.specs import SEARCH_METRICS, load_spec

REPO = Path(__file__).resolve().parents[1]

# Per-method settings small enough for seconds per run; every registered method must be listed.
METHOD_SETTINGS = {
    "normal": {},
    "ogm": {"alpha": 0.5, "modulation_ends": 2},
    "ogm_ge": {"alpha": 0.5, "modulation_ends": 2},
    "gblend": {"mode": "online", "estimate_epochs": 1, "estimate_window_epochs": 1},
    "audio_only": {},
    "visual_only": {},
    "avslowfast": {"config": "tiny"},
    "avid": {"config": "Cross-N64", "probe_epochs": 20, "embedding_dim": 16},
    "cma": {"config": "InstX-N64-PosW-N8-Top2", "probe_epochs": 20, "embedding_dim": 16},
    "mmpareto": {"magnitude_scale": 1.5},
    "pmr": {"prototype_subset_fraction": 0.5, "prototype_momentum": 0.2, "entropy_epochs": 2, "rebalance_end_epoch": 3},
    "agm": {"modulation_strength": 1.5, "modulation_end_epoch": 2},
    "mla": {},
}
# Keys that hold wall-clock time, not results.
TIMING_KEYS = {"epoch_seconds", "train_seconds"}


def engine_spec(root: Path, cache: Path, name: str, epochs: int = 2, **method):
    frames = 4 if name == "avslowfast" else 2
    return load_spec({
        "name": "engine",
        "data": {"source": "dataset", "root": str(root), "cache_dir": str(cache),
                 "decode": {"num_frames": frames, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "method": {"name": name, **METHOD_SETTINGS[name], **method},
        "train": {"epochs": epochs, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001},
    })


class Recorder:
    """`report` for the engine: keeps each epoch's metrics and its checkpoint state as bytes, the way
    a checkpoint leaves the process (torch.save), loaded back with weights_only=True."""

    def __init__(self):
        self.metrics: list[dict[str, float]] = []
        self.states: list[bytes] = []

    def __call__(self, metrics, state):
        self.metrics.append(metrics)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.states.append(buffer.getvalue())

    def state(self, epoch: int):
        return torch.load(io.BytesIO(self.states[epoch]), map_location="cpu", weights_only=True)


def results(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in TIMING_KEYS}  # a seed group's too


def check_probabilities(packed, rows: list[dict], self_supervised: bool) -> None:
    """The joint softmax of every prediction row, packed out of the rows into one float16 (rows, classes)
    tensor in row order: each row's probabilities sum to 1 and give its true class the p_true of its row."""
    if self_supervised:
        assert packed is None
        return
    assert all("probs" not in r for r in rows)
    assert packed["clip_id"] == [r["clip_id"] for r in rows] and packed["split"] == [r["split"] for r in rows]
    assert packed["model"] == [r["model"] for r in rows]
    probs = packed["probs"]
    assert probs.dtype == torch.float16 and probs.shape == (len(rows), 3)
    probs = probs.float()
    # float16 keeps 11 significant bits: each entry within 2^-11 of its float32 value.
    assert torch.allclose(probs.sum(1), torch.ones(len(rows)), atol=2e-3)
    labels = torch.tensor([r["label"] for r in rows])
    p_true = torch.tensor([r["p_true"] for r in rows], dtype=torch.float32)
    assert torch.allclose(probs[torch.arange(len(rows)), labels], p_true, atol=1e-3)


def test_every_registered_method_has_engine_settings():
    assert set(method_names()) == set(METHOD_SETTINGS)


def start_point(request, name: str) -> dict[str, str]:
    """Section fields a method needs to start (CMA: a trained AVID checkpoint)."""
    stage = get_method(name).start_stage(get_method(name).Section(name=name))
    return {"init_from": request.getfixturevalue("avid_checkpoint")} if stage else {}


@pytest.mark.parametrize("name", list(METHOD_SETTINGS))
def test_method_trains_reports_every_epoch_and_resumes_exactly(synth_dataset, tmp_path, name, request):
    cls = get_method(name)
    straight = Recorder()
    start = start_point(request, name)
    straight_spec = engine_spec(synth_dataset, tmp_path / "cache", name, epochs=3, **start)
    history = fit(straight_spec, report=straight)
    assert [m["epoch"] for m in straight.metrics] == [0.0, 1.0, 2.0]
    assert history == straight.metrics
    for metrics in straight.metrics:
        expected = {"acc", "loss_train", "lr", "best_acc", "best_epoch"}
        expected |= {"acc_audio", "acc_visual", "gap_av"} if cls.modality is None else set()
        expected |= {"shapley_audio", "shapley_visual"} if cls.modality is None and not cls.self_supervised else set()
        expected |= {"k_audio", "k_visual", "ratio_av", "modulation_active"} if "alpha" in cls.label_fields else set()
        expected |= {"gblend_w_audio", "gblend_w_visual", "gblend_w_joint"} if name == "gblend" else set()
        assert expected <= set(metrics), expected - set(metrics)
        # What the method declares (a sweep's search.metric is checked against it) is what its epochs report.
        declared = cls.epoch_metrics(straight_spec)
        assert declared <= set(metrics), declared - set(metrics)
        assert set(metrics) & set(SEARCH_METRICS) == declared & set(SEARCH_METRICS)
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["acc"] <= 1.0
    # Held-out test numbers come once, at the end, for classifiers; self-supervised methods have none.
    assert ("test_acc" in straight.metrics[-1]) == (not cls.self_supervised)
    assert not any(k.startswith("test_") for m in straight.metrics[:-1] for k in m)

    # Per-clip predictions behind the last epoch's `acc` (final model, val) and `test_acc` (selected model, test).
    rows = straight.state(2)["predictions"]
    if cls.self_supervised:
        assert rows == []
    else:
        final = straight.metrics[-1]
        for split, which, key in (("val", "final", "acc"), ("test", "selected", "test_acc")):
            part = [r for r in rows if r["split"] == split]
            assert part and all(r["model"] == which for r in part) and len({r["clip_id"] for r in part}) == len(part)
            assert sum(r["pred"] == r["label"] for r in part) / len(part) == pytest.approx(final[key])
            if cls.modality is None:
                audio = sum(r["pred_audio"] == r["label"] for r in part) / len(part)
                assert audio == pytest.approx(final[key.replace("acc", "acc_audio")])
    check_probabilities(straight.state(2)["probabilities"], rows, cls.self_supervised)

    state = straight.state(0)
    assert state["epoch"] == 0 and state["history"] == straight.metrics[:1]
    assert state["predictions"] == [] and state["probabilities"] is None  # only the last epoch carries them
    assert state["num_classes"] == 3 and len(state["class_names"]) == 3
    resumed = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", name, epochs=3, **start), report=resumed, load_state=lambda: state)
    assert [m["epoch"] for m in resumed.metrics] == [1.0, 2.0]
    # Same model, optimiser, method state and RNG streams: the same numbers as the undisturbed run.
    assert [results(m) for m in resumed.metrics] == [results(m) for m in straight.metrics[1:]]


def test_ogm_modulation_window_and_coefficients_follow_the_spec(synth_dataset, tmp_path):
    recorder = Recorder()
    spec = engine_spec(synth_dataset, tmp_path / "cache", "ogm_ge", epochs=3)
    spec = spec.model_copy(update={"method": spec.method.model_copy(update={"modulation_starts": 1, "modulation_ends": 2})})
    fit(spec, report=recorder)
    assert [m["modulation_active"] for m in recorder.metrics] == [0.0, 1.0, 0.0]
    for m in recorder.metrics:
        # One modality is damped (k < 1), the other keeps k = 1 (official main.py's rule).
        assert min(m["k_audio"], m["k_visual"]) < 1.0 or m["ratio_av"] == pytest.approx(1.0)


def test_given_gblend_weights_are_normalised_and_used(synth_dataset, tmp_path):
    recorder = Recorder()
    spec = engine_spec(synth_dataset, tmp_path / "cache", "gblend")
    spec = spec.model_copy(update={"method": get_method("gblend").Section(
        mode="offline", weights={"audio": 1, "visual": 1, "joint": 2})})
    fit(spec, report=recorder)
    for m in recorder.metrics:
        assert (m["gblend_w_audio"], m["gblend_w_visual"], m["gblend_w_joint"]) == pytest.approx((0.25, 0.25, 0.5))


def test_online_gblend_estimates_from_the_models_train_split_loss_at_each_super_epoch_end(synth_dataset, tmp_path):
    """Alg. 2 re-estimates from L^T and L^V of the model at the end of each super-epoch; L^T_N is the
    loss of that model on the training data (Sec. 3.2), measured in eval mode over the whole split,
    not the mean of the mini-batch losses while the weights moved (`loss_train_*`)."""
    from models import estimate_blend_weights

    recorder = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", "gblend", epochs=3), report=recorder)
    suffix = {"audio": "_audio", "visual": "_visual", "joint": ""}

    def measured(m, train_key):
        return {h: (m[f"{train_key}{s}"], m[f"loss{s}"]) for h, s in suffix.items()}

    first, second, third = recorder.metrics
    assert first["gblend_w_joint"] == pytest.approx(1 / 3)  # one measurement: no estimate yet
    for earlier, later in ((first, second), (second, third)):
        expected = estimate_blend_weights(measured(earlier, "loss_train_eval"), measured(later, "loss_train_eval"))
        assert {h: later[f"gblend_w_{h}"] for h in suffix} == pytest.approx(expected)


def test_train_split_loss_is_the_models_loss_on_the_training_split(synth_dataset, tmp_path):
    from workers.engine import Runtime, build_datasets, build_loaders
    from workers.evaluation import evaluate_classifier

    spec = engine_spec(synth_dataset, tmp_path / "cache", "normal", epochs=1)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"train_split_loss": True})})
    recorder = Recorder()
    fit(spec, report=recorder)
    (metrics,) = recorder.metrics
    model = get_method("normal")(spec, Runtime()).build_model(3)
    model.load_state_dict(recorder.state(0)["model"])
    loaders = build_loaders(spec, build_datasets(spec), Runtime())
    train = evaluate_classifier(model, loaders["train_eval"], torch.device("cpu"), contextlib.nullcontext)
    assert metrics["loss_train_eval"] == pytest.approx(train["loss"]) and metrics["loss_train_eval_audio"] == pytest.approx(train["loss_audio"])
    assert metrics["loss_train_eval"] != pytest.approx(metrics["loss_train"])


def test_spec_import_loads_neither_torch_nor_pyav():
    code = ("import sys, workers.specs, orchestrator.specs; "
            "loaded = [m for m in ('torch', 'av', 'ray') if m in sys.modules]; print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_engine_has_no_branch_on_a_method_name():
    source = (REPO / "workers" / "engine.py").read_text() + (REPO / "workers" / "train_loop.py").read_text()
    for name in method_names():
        assert f'"{name}"' not in source and f"'{name}'" not in source, name


def readme_example_method() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- example-method: begin -->", 1)[1].split("<!-- example-method: end -->", 1)[0]
    return block.split("```python\n", 1)[1].rsplit("```", 1)[0]


def test_readme_example_method(synth_dataset, tmp_path):
    """README's "Adding a method" file, run as written: registered by one file, its loss by hand,
    two epochs through the engine, and its name accepted wherever the spec names methods."""
    (tmp_path / "unimodal_aux.py").write_text(readme_example_method())
    code = f"""
import math, sys, torch
sys.path.insert(0, {str(tmp_path)!r})
import unimodal_aux  # one file: registering it is all a method needs
from models import AVOutput
from workers.engine import Batch, Runtime, fit
from workers.specs import SEARCH_METRICS, load_spec

spec = load_spec({{
    "data": {{"source": "dataset", "root": {str(synth_dataset)!r}, "cache_dir": {str(tmp_path / 'cache')!r},
             "decode": {{"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}}}},
    "model": {{"width": 8}}, "method": {{"name": "unimodal_aux", "aux_weight": 0.5}},
    "train": {{"epochs": 2, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001}},
    "search": {{"compare": ["normal", "unimodal_aux"], "space": {{"method.aux_weight": {{"grid": [0.5, 1.0]}}}}}},
}})
method = unimodal_aux.UnimodalAux(spec, Runtime())
method.setup(None, {{}})
# Hand-computed: two classes, one clip of label 0. CE(z, 0) = log(1 + e^(z1 - z0)).
out = AVOutput(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
batch = Batch(None, None, torch.tensor([0]), None)
sums = {{"loss_train_audio": 0.0, "loss_train_visual": 0.0}}
expected = math.log(1 + math.exp(-2)) + 0.5 * (math.log(2) + math.log(1 + math.e))
got = method.loss(out, batch, sums).item()
assert abs(got - expected) < 1e-6, (got, expected)
history = fit(spec.model_copy(update={{"search": None}}), report=lambda metrics, state: None)
assert [h["epoch"] for h in history] == [0.0, 1.0]
assert all("loss_train_audio" in h and "acc_visual" in h for h in history)
print("ok", round(expected, 6))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]


def test_run_params_are_declared_so_the_report_never_groups_by_them():
    for name in method_names():
        spec = engine_spec(Path("/nonexistent"), Path("/nonexistent"), name)
        cls = get_method(name)
        assert set(cls.run_params(spec)) <= set(cls.run_param_keys), name


def _ddp_rank(rank: int, world_size: int, init_file: str, spec_data: dict, out_dir: str) -> None:
    """One DDP rank of the engine without Ray: gloo process group, DDP-wrapped model, a
    DistributedSampler per rank (what ray.train.torch.prepare_model / prepare_data_loader do)."""
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from workers.engine import Runtime

    torch.set_num_threads(1)  # a forked rank: one thread, as a forked DataLoader worker does
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    def shard(loader):
        sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last)

    reports = []
    runtime = Runtime(rank=rank, world_size=world_size, prepare_model=DistributedDataParallel, prepare_data_loader=shard)
    fit(load_spec(spec_data), report=lambda metrics, state: reports.append(metrics), runtime=runtime)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(reports))
    dist.destroy_process_group()


def run_ddp_ranks(spec_data: dict, tmp_path: Path, world_size: int = 2) -> list[list[dict[str, float]]]:
    """`fit` on `world_size` gloo DDP ranks (forked: the ranks inherit this process's imports, where a
    spawned rank re-imports torch and torchvision); each rank's per-epoch metrics."""
    import json

    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank, args=(world_size, str(tmp_path / "pg"), spec_data, str(tmp_path)), nprocs=world_size,
                       join=True, start_method="fork")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


# Methods that change gradients from numbers computed over the batch (scores, prototypes, sub-gradients):
# computed on one rank's shard alone, the replicas would drift apart.
@pytest.mark.parametrize("name", ["ogm_ge", "agm", "mmpareto", "pmr"])
def test_replicas_stay_identical_on_every_ddp_rank(synth_dataset, tmp_path, name):
    """Each rank trains on its own shard; what the method computes is reduced over ranks first, so every
    rank takes the same step and evaluates the same model: every per-epoch number equal on both ranks."""
    spec_data = engine_spec(synth_dataset, tmp_path / "cache", name, epochs=2).model_dump(mode="json")
    ranks = run_ddp_ranks(spec_data, tmp_path)
    assert len(ranks[0]) == 2
    results_0, results_1 = ([results(m) for m in rank] for rank in ranks)
    assert results_0 == results_1


def test_online_gblend_weights_are_identical_on_every_ddp_rank(synth_dataset, tmp_path):
    """Each rank trains on its own shard, so its running per-head train losses differ; the engine
    averages them over ranks before online G-Blend re-estimates, so every rank blends with the same
    weights (else DDP's averaged gradients mix two different objectives)."""
    spec_data = engine_spec(synth_dataset, tmp_path / "cache", "gblend", epochs=3).model_dump(mode="json")
    ranks = run_ddp_ranks(spec_data, tmp_path)
    keys = ["gblend_w_audio", "gblend_w_visual", "gblend_w_joint", "loss_train", "loss_train_audio", "loss_train_joint",
            "loss_train_eval", "loss_train_eval_audio"]
    for key in keys:
        assert [m[key] for m in ranks[0]] == [m[key] for m in ranks[1]], key
    # Re-estimated after epochs 1 and 2 (super-epochs of 1 epoch): not the uniform start any more.
    assert ranks[0][-1]["gblend_w_joint"] != pytest.approx(1 / 3)


# ---- CMA starts from a trained AVID model (official two-stage schedule) ------------------------


def cma_method(synth_dataset, tmp_path, **method):
    """A CMA method set up on the generated clips (what `fit` does before the first epoch)."""
    from workers.engine import Runtime, build_datasets

    spec = engine_spec(synth_dataset, tmp_path / "cache", "cma", **method)
    cma = get_method("cma")(spec, Runtime())
    model = cma.build_model(3)
    cma.setup(model, build_datasets(spec))
    return cma, model


def test_cma_starts_from_the_avid_model_memory_and_partition(synth_dataset, tmp_path, avid_checkpoint):
    """Official CMA restores the AVID checkpoint's model (av_wrapper `checkpoint:`), memory banks and Z
    (criterions/avid_cma.py AVID_CMA.__init__), then picks positives from that memory."""
    avid = torch.load(avid_checkpoint, map_location="cpu", weights_only=True)
    cma, model = cma_method(synth_dataset, tmp_path, init_from=avid_checkpoint)
    for key, value in avid["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    memory = {k: avid["method"]["criterion"][f"{k}_memory.memory"] for k in ("video", "audio")}
    assert torch.equal(cma.criterion.video_memory.memory, memory["video"])
    assert torch.equal(cma.criterion.audio_memory.memory, memory["audio"])
    assert cma.criterion.partition.item() == avid["method"]["criterion"]["partition"].item() > 0
    # Positives by consensus on the AVID memory, computed here directly: the 2 items most similar in both modalities.
    agreement = torch.minimum(memory["video"] @ memory["video"].T, memory["audio"] @ memory["audio"].T)
    agreement.fill_diagonal_(float("-inf"))
    assert torch.equal(cma.criterion.positive_set, agreement.topk(2, dim=1).indices.sort(dim=1).values)


def test_cma_refuses_a_missing_or_wrong_start_point(synth_dataset, tmp_path):
    with pytest.raises(ValueError, match="method.init_from: cma starts from a trained AVID model"):
        cma_method(synth_dataset, tmp_path)
    with pytest.raises(ValueError, match="method.init_from: no file"):
        cma_method(synth_dataset, tmp_path, init_from=str(tmp_path / "missing.pt"))
    recorder = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", "normal", epochs=1), report=recorder)
    (tmp_path / "normal.pt").write_bytes(recorder.states[-1])
    with pytest.raises(ValueError, match=r"method.init_from: .*normal.pt is a 'normal' checkpoint, not an AVID one"):
        cma_method(synth_dataset, tmp_path, init_from=str(tmp_path / "normal.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="method.init_from: .*junk.pt is not a readable checkpoint"):
        cma_method(synth_dataset, tmp_path, init_from=str(tmp_path / "junk.pt"))


def test_cma_refuses_an_avid_start_of_another_size(synth_dataset, tmp_path, avid_checkpoint):
    with pytest.raises(ValueError, match=r"method.init_from: the AVID memory bank is \(18, 16\).*embedding_dim 32"):
        cma_method(synth_dataset, tmp_path, init_from=avid_checkpoint, embedding_dim=32)


@pytest.mark.parametrize("name", ["ogm_ge", "pmr"])
def test_seeds_trained_side_by_side_compute_what_each_computes_alone_and_resume_exactly(synth_dataset, tmp_path, name):
    """A sweep trains a configuration's seeds in one run (`fit_group`): each seed's numbers must be the ones it
    gives alone (OGM-GE draws Gaussian noise every step, PMR a random prototype subset every epoch: a shared
    random stream would change both), and a group resumed from its epoch-0 checkpoint must continue exactly."""
    from workers.engine import fit_group, member_prefix, seed_member, seed_members

    seeds = [0, 3]
    spec = engine_spec(synth_dataset, tmp_path / "cache", name, epochs=3)
    alone = {}
    for seed in seeds:
        alone[seed] = fit(spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})}),
                          report=lambda metrics, state: None)
    assert results(alone[0][-1]) != results(alone[3][-1])  # the seeds differ, so the comparison below can fail
    reports, checkpoints = [], Recorder()  # each epoch's group state serialised when reported, as Ray would
    histories = fit_group(seed_members(spec, seeds),
                          report=lambda metrics, state: (reports.append(metrics), checkpoints(metrics, state)))
    for seed in seeds:
        member = seed_member(seed)
        assert [results(m) for m in histories[member]] == [results(m) for m in alone[seed]]
        own = [{k.removeprefix(member_prefix(member)): v for k, v in r.items() if k.startswith(member_prefix(member))}
               for r in reports]
        assert own == histories[member]
    # The group's own keys are the seeds' means: what ASHA decides on.
    for epoch, report in enumerate(reports):
        assert report["epoch"] == epoch
        assert report["acc"] == pytest.approx(sum(alone[s][epoch]["acc"] for s in seeds) / len(seeds))
    saved = checkpoints.state(0)
    assert set(saved) == {seed_member(s) for s in seeds} and all(saved[m]["epoch"] == 0 for m in saved)
    resumed = []
    fit_group(seed_members(spec, seeds), report=lambda metrics, state: resumed.append(metrics), load_state=lambda: saved)
    assert [results(m) for m in resumed] == [results(m) for m in reports[1:]]


def test_estimation_heads_trained_side_by_side_compute_what_each_computes_alone(synth_dataset, tmp_path):
    """G-Blend's estimation stage trains its three models in one run (`fit_group` with different methods): each
    head's losses, which the blend weights are computed from, must be the ones it gives trained alone."""
    from workers.engine import fit_group

    heads = ["audio_only", "visual_only", "normal"]
    specs = {name: engine_spec(synth_dataset, tmp_path / "cache", name, epochs=2) for name in heads}
    alone = {name: fit(spec, report=lambda metrics, state: None) for name, spec in specs.items()}
    assert results(alone["audio_only"][-1]) != results(alone["normal"][-1])
    reports = []
    together = fit_group(specs, report=lambda metrics, state: reports.append(metrics))
    for name in heads:
        assert [results(m) for m in together[name]] == [results(m) for m in alone[name]]
    # Three different models: no mean over them is reported, only the epoch beside each head's own metrics.
    assert [{k for k in r if "/" not in k} for r in reports] == [{"epoch"}, {"epoch"}]
