"""MLA (Zhang et al., CVPR 2024): entropy fusion weights, the projector recursion and the projected head
gradient on hand-worked numbers, the alternating step, the section, DDP agreement and an engine run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.mla import (
    build_mla_classifier,
    entropy_fusion_weights,
    fuse_logits,
    owm_alpha,
    prediction_entropy,
    project_head_gradient,
    update_projector,
)
from workers.specs import SpecError, load_spec

LN2 = math.log(2)
# Entropy of the prediction (0.9, 0.1): -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.0948245 + 0.2302585.
H_91 = 0.3250830
# w_m = exp(max e - e_m) / sum(...) = exp(-e_m) / sum(exp(-e)); exp(-ln 2) = 0.5,
# exp(-H_91) = 0.9^0.9 * 0.1^0.1 = 0.909533 * 0.794328 = 0.722467.
W_UNSURE = 0.5 / (0.5 + 0.722467)  # 0.409008: weight of the (0.5, 0.5) modality
W_SURE = 0.722467 / (0.5 + 0.722467)  # 0.590992: weight of the (0.9, 0.1) modality


def logits_of(*rows):
    """Logits whose softmax over classes is the given probabilities: log p."""
    return torch.tensor(rows).log()


# ---- test-time uncertainty-based fusion -------------------------------------------------------


def test_per_clip_entropy_and_weights_by_hand():
    audio = logits_of([0.5, 0.5], [0.9, 0.1])
    visual = logits_of([0.9, 0.1], [0.5, 0.5])
    assert prediction_entropy(audio, "clip").tolist() == pytest.approx([LN2, H_91], abs=1e-6)
    w_a, w_v = entropy_fusion_weights(audio, visual, "clip")
    # Clip 0: audio unsure, visual sure; clip 1 the other way round.
    assert w_a.tolist() == pytest.approx([W_UNSURE, W_SURE], abs=1e-6)
    assert w_v.tolist() == pytest.approx([W_SURE, W_UNSURE], abs=1e-6)
    fused = fuse_logits(audio, visual, w_a, w_v)
    assert fused[0].tolist() == pytest.approx((W_UNSURE * audio[0] + W_SURE * visual[0]).tolist(), abs=1e-6)
    assert fused[1].tolist() == pytest.approx((W_SURE * audio[1] + W_UNSURE * visual[1]).tolist(), abs=1e-6)


def test_official_batch_entropy_softmaxes_over_the_batch_by_hand():
    # Official calculate_entropy: softmax(dim=0), over the 2 clips of each class column, summed over all.
    audio = torch.zeros(2, 2)  # every column (0.5, 0.5): e_a = 4 * 0.5 ln 2 = 2 ln 2
    visual = logits_of([0.9, 0.5], [0.1, 0.5])  # columns (0.9, 0.1) and (0.5, 0.5): e_v = H_91 + ln 2
    e_a, e_v = prediction_entropy(audio, "batch"), prediction_entropy(visual, "batch")
    assert e_a.dim() == 0 and e_a.item() == pytest.approx(2 * LN2, abs=1e-6)
    assert e_v.item() == pytest.approx(H_91 + LN2, abs=1e-6)
    # exp(-2 ln 2) = 0.25, exp(-(H_91 + ln 2)) = 0.361234: the same ratio as above.
    w_a, w_v = entropy_fusion_weights(audio, visual, "batch")
    assert w_a.dim() == 0 and (w_a.item(), w_v.item()) == pytest.approx((W_UNSURE, W_SURE), abs=1e-6)
    assert fuse_logits(audio, visual, w_a, w_v).flatten().tolist() == pytest.approx((W_SURE * visual).flatten().tolist(), abs=1e-6)


def test_fusion_weights_survive_large_entropies_and_saturated_softmax():
    # exp(max e - e) never overflows; a probability that underflows to 0 gives 0 * log 0 = 0, not nan.
    audio = torch.tensor([[300.0, 0.0, 0.0]])
    visual = torch.zeros(1, 3)  # ln 3
    w_a, w_v = entropy_fusion_weights(audio, visual, "clip")
    assert w_a.item() == pytest.approx(3 / 4, abs=1e-6) and w_v.item() == pytest.approx(1 / 4, abs=1e-6)
    big = torch.zeros(4096, 2)  # batch scope: e = 2 ln 4096 for each modality -> equal weights
    w_a, w_v = entropy_fusion_weights(big, big.clone(), "batch")
    assert (w_a.item(), w_v.item()) == (0.5, 0.5)


def test_model_forward_is_the_entropy_fusion_of_the_shared_head():
    torch.manual_seed(0)
    model = build_mla_classifier(3, audio_arch="resnet10", visual_arch="resnet10", width=4).eval()
    audio, visual = torch.randn(2, 1, 32, 16), torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        out = model(audio, visual)
        la = model.head(model.audio_encoder(audio))
        lv = model.head(model.visual_encoder(visual))
    w_a, w_v = entropy_fusion_weights(la, lv, "batch")
    assert torch.allclose(out.logits_audio, la) and torch.allclose(out.logits_visual, lv)
    assert torch.allclose(out.logits, w_a * la + w_v * lv)


# ---- the projector ----------------------------------------------------------------------------


def test_alpha_schedule_by_hand():
    # Official: alpha = 0.1 ** (batch_index / len_dataloader + 1)
    assert owm_alpha(0, 10) == pytest.approx(0.1)
    assert owm_alpha(5, 10) == pytest.approx(0.0316228, rel=1e-6)  # 0.1 ** 1.5
    assert owm_alpha(9, 10) == pytest.approx(0.1**1.9)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        owm_alpha(0, 0)


def test_official_projector_update_2x2_by_hand():
    # P = I, r = (1, 2), alpha = 0.1: k = P r^T = (1, 2); official denominator alpha + k r (outer product)
    # = [[1.1, 2.1], [2.1, 4.1]], element-wise: P - k k^T / (.) = [[1 - 1/1.1, -2/2.1], [-2/2.1, 1 - 4/4.1]]
    # = [[1/11, -20/21], [-20/21, 1/41]], then divided by its Frobenius norm.
    p = update_projector(torch.eye(2), torch.tensor([1.0, 2.0]), 0.1, "official")
    raw = [[1 / 11, -20 / 21], [-20 / 21, 1 / 41]]
    fro = math.sqrt((1 / 11) ** 2 + 2 * (20 / 21) ** 2 + (1 / 41) ** 2)  # 1.350155
    assert p.flatten().tolist() == pytest.approx([v / fro for row in raw for v in row], abs=1e-6)


def test_owm_projector_update_2x2_by_hand():
    # Scalar denominator alpha + r k = 0.1 + 5 = 5.1: P = I - [[1, 2], [2, 4]] / 5.1 = [[4.1, -2], [-2, 1.1]] / 5.1,
    # normalised: [[4.1, -2], [-2, 1.1]] / sqrt(4.1^2 + 4 + 4 + 1.1^2) = / sqrt(26.02).
    p = update_projector(torch.eye(2), torch.tensor([1.0, 2.0]), 0.1, "owm")
    s = math.sqrt(26.02)
    assert p.flatten().tolist() == pytest.approx([4.1 / s, -2 / s, -2 / s, 1.1 / s], abs=1e-6)
    # P r^T = (0.1, 0.2) / 5.1 / (1 / s): the direction r is nearly projected out.
    assert (p @ torch.tensor([1.0, 2.0])).tolist() == pytest.approx([0.1 / s, 0.2 / s], abs=1e-6)


def test_official_projector_update_3x3_by_hand():
    # P = I, r = (1, 0, 2), alpha = 0.1: k = r; k k^T = [[1, 0, 2], [0, 0, 0], [2, 0, 4]];
    # alpha + k r = [[1.1, .1, 2.1], [.1, .1, .1], [2.1, .1, 4.1]] ->
    # P = [[1/11, 0, -20/21], [0, 1, 0], [-20/21, 0, 1/41]] / fro.
    p = update_projector(torch.eye(3), torch.tensor([1.0, 0.0, 2.0]), 0.1, "official")
    raw = [1 / 11, 0, -20 / 21, 0, 1, 0, -20 / 21, 0, 1 / 41]
    fro = math.sqrt(sum(v * v for v in raw))
    assert p.flatten().tolist() == pytest.approx([v / fro for v in raw], abs=1e-6)


def test_projector_update_from_a_running_projector_by_hand():
    # P = diag(2, 1), r = (1, 1), alpha = 0.1: k = P r^T = (2, 1), k k^T = [[4, 2], [2, 1]].
    P, r = torch.diag(torch.tensor([2.0, 1.0])), torch.tensor([1.0, 1.0])
    # OWM: alpha + r k = 3.1 -> [[2 - 4/3.1, -2/3.1], [-2/3.1, 1 - 1/3.1]] = [[2.2, -2], [-2, 2.1]] / 3.1.
    s = math.sqrt(2.2**2 + 4 + 4 + 2.1**2)  # sqrt(17.25)
    assert update_projector(P, r, 0.1, "owm").flatten().tolist() == pytest.approx(
        [2.2 / s, -2 / s, -2 / s, 2.1 / s], abs=1e-6)
    # Official: alpha + k r = [[2.1, 2.1], [1.1, 1.1]] (k_i r_j), element-wise and no longer symmetric:
    # [[2 - 4/2.1, -2/2.1], [-2/1.1, 1 - 1/1.1]] = [[2/21, -20/21], [-20/11, 1/11]].
    raw = [2 / 21, -20 / 21, -20 / 11, 1 / 11]
    fro = math.sqrt(sum(v * v for v in raw))
    assert update_projector(P, r, 0.1, "official").flatten().tolist() == pytest.approx([v / fro for v in raw], abs=1e-6)


def test_projected_gradient_by_hand():
    g = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, -1.0]])  # (K=3, D=2)
    # grad @ P^T with the OWM projector above, [[4.1, -2], [-2, 1.1]] / s:
    # (1, 1) -> (2.1, -0.9); (0, 2) -> (-4, 2.2); (3, -1) -> (14.3, -7.1); all / s.
    s = math.sqrt(26.02)
    p = torch.tensor([[4.1, -2.0], [-2.0, 1.1]]) / s
    expected = [2.1, -0.9, -4.0, 2.2, 14.3, -7.1]
    assert project_head_gradient(g, p).flatten().tolist() == pytest.approx([v / s for v in expected], abs=1e-6)
    # A non-symmetric P shows the transpose: P = [[a, b], [c, d]] maps row (x, y) to (a x + b y, c x + d y).
    q = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert project_head_gradient(g[:1], q).tolist() == [[3.0, 7.0]]


# ---- the alternating step -----------------------------------------------------------------------


def mla_method(**section):
    from workers.engine import Runtime
    from workers.methods import get_method

    spec = load_spec({"model": {"width": 4}, "method": {"name": "mla", **section},
                      "train": {"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.0, "weight_decay": 0.0}})
    method = get_method("mla")(spec, Runtime())
    torch.manual_seed(0)
    model = method.build_model(3)
    method.loaders = {"train": [None] * 4}  # 4 batches per epoch: alpha(step 0) = 0.1
    method.setup(model, {})
    return method, model


def step_batch(seed=1):
    from workers.engine import Batch

    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(4, 1, 32, 16, generator=g), torch.randn(4, 3, 2, 32, 32, generator=g),
                 torch.tensor([0, 1, 2, 0]), torch.arange(4))


def test_alternating_step_trains_each_encoder_alone_and_projects_the_shared_head():
    from contextlib import nullcontext
    from collections import defaultdict

    method, model = mla_method()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = step_batch()
    # The expected step by hand: audio (updates == 0: official skips the projection on the very first step),
    # then visual with P = update(I, mean z_v, alpha 0.1) and head.weight -= lr * grad @ P^T.
    ref = copy.deepcopy(model).train()
    z, logits = ref.unimodal("audio", batch.audio)
    F.cross_entropy(logits, batch.labels).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
                p.grad = None
    head_w, head_b = ref.head.weight.detach().clone(), ref.head.bias.detach().clone()
    z, logits = ref.unimodal("visual", batch.visual)
    F.cross_entropy(logits, batch.labels).backward()
    P = update_projector(torch.eye(32), z.detach().mean(0), 0.1, "owm")
    expected_w = head_w - 0.1 * ref.head.weight.grad @ P.t()
    expected_b = head_b - 0.1 * ref.head.bias.grad  # the bias is not projected

    audio_before = copy.deepcopy(model.audio_encoder.state_dict())
    sums = defaultdict(float)
    loss = method.train_step(model, optimizer, batch, 0, 0, sums, nullcontext)
    assert method.updates == 2 and torch.allclose(method.projector, P, atol=1e-6)
    assert torch.allclose(model.head.weight, expected_w, atol=1e-6)
    assert torch.allclose(model.head.bias, expected_b, atol=1e-6)
    # The visual step leaves the audio encoder where the audio step put it (no idle step).
    for k, v in model.audio_encoder.state_dict().items():
        assert torch.allclose(v, ref.audio_encoder.state_dict()[k]), k
    assert any(not torch.equal(v, audio_before[k]) for k, v in model.audio_encoder.state_dict().items())
    assert loss.item() == pytest.approx((sums["loss_train_audio"] + sums["loss_train_visual"]).item() / 2)
    assert all(p.grad is None for p in model.parameters())


def test_without_head_gradient_modification_the_projector_stays_identity():
    from contextlib import nullcontext
    from collections import defaultdict

    method, model = mla_method(head_gradient_modification=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.train_step(model, optimizer, step_batch(), 0, 0, defaultdict(float), nullcontext)
    assert torch.equal(method.projector, torch.eye(32)) and method.updates == 2


def test_method_state_round_trip():
    from contextlib import nullcontext
    from collections import defaultdict

    method, model = mla_method(projector_update="owm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        method.train_step(model, optimizer, step_batch(step), 0, step, defaultdict(float), nullcontext)
    state = method.state_dict()
    fresh, _ = mla_method(projector_update="owm")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.projector, method.projector) and fresh.updates == method.updates == 4


# ---- the section ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("projector_update", "svd"), ("fusion_entropy_scope", "epoch"),
                                          ("head_gradient_modification", "sometimes"), ("alpha", 0.5)])
def test_bad_section_values_name_the_field(field, value):
    with pytest.raises(SpecError, match=rf"method\.{field}"):
        load_spec({"method": {"name": "mla", field: value}})


def test_mla_refuses_a_fusion_layer_it_does_not_have():
    with pytest.raises(SpecError, match="model.fusion"):
        load_spec({"model": {"fusion": "film"}, "method": {"name": "mla"}})


def test_run_params_and_label():
    from workers.methods import get_method

    spec = load_spec({"method": {"name": "mla", "head_gradient_modification": False, "fusion_entropy_scope": "clip"}})
    cls = get_method("mla")
    assert cls.run_params(spec)["mla_head_projection"] == "off"
    assert cls.run_label(spec.method) == ["noproj", "H-clip"]


# ---- DDP: every rank takes the same step ------------------------------------------------------------


def _ddp_rank(rank: int, init_file: str, out_dir: str) -> None:
    from collections import defaultdict
    from contextlib import nullcontext

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from workers.engine import Batch, Runtime
    from workers.methods import get_method

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    spec = load_spec({"model": {"width": 4}, "method": {"name": "mla"},
                      "train": {"optimizer": "sgd", "learning_rate": 0.1}})
    method = get_method("mla")(spec, Runtime(rank=rank, world_size=2, prepare_model=DistributedDataParallel))
    torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
    wrapped = DistributedDataParallel(method.build_model(3))
    method.loaders = {"train": [None] * 3}
    method.setup(wrapped.module, {})
    optimizer = torch.optim.SGD(wrapped.module.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        batch = step_batch(seed=10 * step + rank)  # each rank its own shard
        batch = Batch(batch.audio[:2], batch.visual[:2], batch.labels[:2], batch.index[:2])
        method.train_step(wrapped, optimizer, batch, 0, step, defaultdict(float), nullcontext)
    params = torch.cat([p.detach().flatten() for p in wrapped.module.parameters()])
    torch.save({"projector": method.projector, "params": params}, Path(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_projector_and_steps_are_identical_on_every_ddp_rank(tmp_path):
    import torch.multiprocessing as mp

    # fork, not spawn: the ranks inherit the imports (a spawned rank re-imports torch and torchvision,
    # ~7 s here); each rank sets one thread first, as a forked DataLoader worker does.
    mp.start_processes(_ddp_rank, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["projector"], torch.eye(32))
    assert torch.equal(r0["projector"], r1["projector"])
    assert torch.equal(r0["params"], r1["params"])


# ---- through the engine ------------------------------------------------------------------------


def test_engine_logs_mla_internals(synth_dataset, tmp_path):
    from test_engine import Recorder, engine_spec
    from workers.engine import fit

    recorder = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", "mla", epochs=2, fusion_entropy_scope="clip"), report=recorder)
    for m in recorder.metrics:
        for key in ("loss_train_audio", "loss_train_visual", "fusion_weight_audio", "fusion_weight_visual",
                    "projector_effective_rank", "projector_updates_skipped", "acc", "acc_audio", "acc_visual",
                    "shapley_audio"):
            assert key in m, key
        assert m["fusion_weight_audio"] + m["fusion_weight_visual"] == pytest.approx(1.0)
        assert 0 < m["fusion_weight_audio"] < 1
        assert 1.0 <= m["projector_effective_rank"] <= 64  # width 8: 64-d features
        assert m["loss_train"] == pytest.approx((m["loss_train_audio"] + m["loss_train_visual"]) / 2)
    last = recorder.metrics[-1]
    assert last["test_fusion_weight_audio"] + last["test_fusion_weight_visual"] == pytest.approx(1.0)
    state = recorder.state(1)["method"]
    assert state["projector"].shape == (64, 64) and state["updates"] == 2 * 2 * 2  # 2 epochs x 2 batches x 2 steps
