"""Tests for models/avid_cma.py (AVID / AVID-CMA, Morgado et al. CVPR 2021).

Loss values are recomputed here by hand from the official formula (criterions/nce.py):
P(model | pos) = e^s / (e^s + K Z), P(noise | neg) = K Z / (e^s + K Z), with Z the mean exp-score of
the first batch's negatives, and loss = mean_b[-mean_pos log P(model) - sum_neg log P(noise)].
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from models.avid_cma import (
    AVEmbeddings,
    AVIDConfig,
    AVIDCriterion,
    CMACriterion,
    MemoryBank,
    build_avid_model,
    linear_probe_accuracy,
    nce_loss,
    parse_avid_config,
)

T = 0.07  # official temperature, criterions/avid.py


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _nce_by_hand(pos_scores, neg_scores, z):
    """One item's NCE loss, explicit exp / log."""
    k = len(neg_scores)
    pos_term = sum(-math.log(math.exp(s) / (math.exp(s) + k * z)) for s in pos_scores) / len(pos_scores)
    neg_term = sum(-math.log(k * z / (math.exp(s) + k * z)) for s in neg_scores)
    return pos_term + neg_term


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def _embeddings(audio, visual):
    a, v = torch.tensor(audio), torch.tensor(visual)
    return AVEmbeddings(audio=a, visual=v, features_audio=a, features_visual=v)


# ---- the NCE loss --------------------------------------------------------------------------------


def test_nce_loss_matches_hand_computation():
    pos = [[1.5], [-0.3]]
    neg = [[0.2, -1.0], [2.0, 0.4]]
    z = 1.7
    expected = (_nce_by_hand(pos[0], neg[0], z) + _nce_by_hand(pos[1], neg[1], z)) / 2
    got = nce_loss(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64), z)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Several positives are averaged, negatives summed.
    got2 = nce_loss(torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64), 2.0)
    assert got2.item() == pytest.approx(_nce_by_hand([1.0, 3.0], [0.5], 2.0), rel=1e-12)


def test_nce_loss_stays_finite_at_large_scores():
    # Scores of +-1/0.07 ~ 14.3 are the extremes with unit vectors; float32 must stay finite.
    got = nce_loss(torch.tensor([[14.3]]), torch.tensor([[14.3, -14.3]]), 1e-3)
    assert torch.isfinite(got)


# ---- memory bank ---------------------------------------------------------------------------------


def test_memory_bank_init_is_unit_norm_and_seeded():
    a = MemoryBank(10, 4, generator=torch.Generator().manual_seed(3))
    b = MemoryBank(10, 4, generator=torch.Generator().manual_seed(3))
    c = MemoryBank(10, 4, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a.memory.norm(dim=1), torch.ones(10))
    assert torch.equal(a.memory, b.memory) and not torch.equal(a.memory, c.memory)


def test_memory_update_by_hand():
    bank = MemoryBank(3, 2, momentum=0.5)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    bank.update(torch.tensor([1]), torch.tensor([[0.0, 1.0]]))
    # 0.5 * [1, 0] + 0.5 * [0, 1] = [0.5, 0.5] -> normalised [1/sqrt2, 1/sqrt2]
    r = 1 / math.sqrt(2)
    assert torch.allclose(bank.memory, torch.tensor([[1.0, 0.0], [r, r], [0.0, 1.0]]))

    bank = MemoryBank(2, 2, momentum=0.9)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    bank.update(torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
    n = math.sqrt(0.9**2 + 0.1**2)
    assert bank.memory[0].tolist() == pytest.approx([0.9 / n, 0.1 / n])
    with pytest.raises(ValueError, match="indices"):
        bank.update(torch.tensor([2]), torch.tensor([[0.0, 1.0]]))


def test_negatives_exclude_self_and_are_uniform():
    bank = MemoryBank(5, 2)
    indices = torch.arange(5)
    draws = bank.sample_negatives(indices, 4000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (5, 4000)
    for i in range(5):
        assert (draws[i] != i).all()
        counts = torch.bincount(draws[i], minlength=5).float() / 4000
        others = [counts[j].item() for j in range(5) if j != i]
        assert all(abs(c - 0.25) < 0.04 for c in others)


def test_negatives_avoid_the_positive_set():
    bank = MemoryBank(8, 2)
    exclude = torch.tensor([[1, 4, 5], [0, 2, 7]])  # sorted rows, as positive_set keeps them
    gen = torch.Generator().manual_seed(1)
    draws = bank.sample_negatives(torch.tensor([3, 6]), 5000, generator=gen, exclude=exclude)
    for row, excluded in zip(draws, exclude.tolist()):
        kept = sorted(set(range(8)) - set(excluded))
        assert sorted(set(row.tolist())) == kept  # every kept item is reachable, no excluded one is
        counts = torch.bincount(row, minlength=8).float() / 5000
        assert all(abs(counts[j].item() - 1 / 5) < 0.04 for j in kept)


# ---- AVID criterion ------------------------------------------------------------------------------


def _hand_bank(criterion):
    # 4 items, 2-D memories.
    video = [_unit(0), _unit(90), _unit(45), _unit(180)]
    audio = [_unit(30), _unit(60), _unit(200), _unit(300)]
    criterion.video_memory.memory.copy_(torch.tensor(video))
    criterion.audio_memory.memory.copy_(torch.tensor(audio))
    return video, audio


def test_cross_avid_loss_by_hand():
    crit = AVIDCriterion("Cross-N2", num_items=4, embedding_dim=2, generator=torch.Generator().manual_seed(0))
    video_mem, audio_mem = _hand_bank(crit)
    visual = [_unit(10), _unit(100)]
    audio = [_unit(20), _unit(80)]
    indices = [0, 1]
    negatives = [[2, 3], [3, 0]]
    loss, stats = crit(_embeddings(audio, visual), torch.tensor(indices), negative_indices=torch.tensor(negatives))

    # Z: mean exp-score of the first task's (v2a) negatives in this first batch.
    v2a_neg = [[_dot(visual[b], audio_mem[j]) / T for j in negatives[b]] for b in range(2)]
    z = sum(math.exp(s) for row in v2a_neg for s in row) / 4
    v2a = sum(_nce_by_hand([_dot(visual[b], audio_mem[indices[b]]) / T], v2a_neg[b], z) for b in range(2)) / 2
    a2v_neg = [[_dot(audio[b], video_mem[j]) / T for j in negatives[b]] for b in range(2)]
    a2v = sum(_nce_by_hand([_dot(audio[b], video_mem[indices[b]]) / T], a2v_neg[b], z) for b in range(2)) / 2
    assert stats["partition"].item() == pytest.approx(z, rel=1e-5)
    assert stats["loss/xmodal_inst/v2a"].item() == pytest.approx(v2a, rel=1e-5)
    assert stats["loss/xmodal_inst/a2v"].item() == pytest.approx(a2v, rel=1e-5)
    assert loss.item() == pytest.approx((v2a + a2v) / 2, rel=1e-5)

    # Z is frozen after the first batch (NCECriterion.compute_partition_function).
    _, stats2 = crit(_embeddings(audio[::-1], visual[::-1]), torch.tensor(indices),
                     negative_indices=torch.tensor(negatives))
    assert stats2["partition"].item() == pytest.approx(z, rel=1e-5)


def test_joint_avid_weights_both_groups_equally():
    crit = AVIDCriterion("Joint-N2", num_items=4, embedding_dim=2)
    video_mem, audio_mem = _hand_bank(crit)
    crit.partition.fill_(2.5)  # fixed Z to isolate the weighting
    visual, audio = [_unit(10)], [_unit(20)]
    neg = [2, 3]
    loss, _ = crit(_embeddings(audio, visual), torch.tensor([0]), negative_indices=torch.tensor([neg]))
    z = 2.5

    def term(ctx, mem_pos, mem_neg):
        return _nce_by_hand([_dot(ctx, mem_pos[0]) / T], [_dot(ctx, mem_neg[j]) / T for j in neg], z)

    xmodal = (term(visual[0], audio_mem, audio_mem) + term(audio[0], video_mem, video_mem)) / 2
    wmodal = (term(visual[0], video_mem, video_mem) + term(audio[0], audio_mem, audio_mem)) / 2
    # xModal_coeff = wModal_coeff = 1, normalised to 0.5 each (criterions/avid.py AVID.__init__).
    assert loss.item() == pytest.approx(0.5 * xmodal + 0.5 * wmodal, rel=1e-5)


def test_scores_stay_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(8, 64, generator=gen), dim=1)
    a = torch.nn.functional.normalize(torch.randn(8, 64, generator=gen), dim=1)
    neg = torch.randint(0, 50, (8, 32), generator=gen)
    for name in ("Cross-N32", "InstX-N32-PosW-N8-Top4"):
        crit = (CMACriterion if "Pos" in name else AVIDCriterion)(name, num_items=50, embedding_dim=64)
        crit.partition.fill_(5.0)
        plain, _ = crit(AVEmbeddings(a, v, a, v), torch.arange(8), negative_indices=neg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = crit(AVEmbeddings(a, v, a, v), torch.arange(8), negative_indices=neg)
        assert mixed.dtype == torch.float32 and mixed.item() == plain.item()


def test_update_memory_after_loss():
    crit = AVIDCriterion("Cross-N2", num_items=4, embedding_dim=2)
    video_mem, audio_mem = _hand_bank(crit)
    emb = _embeddings([[0.0, 3.0]], [[2.0, 0.0]])  # not unit length: the criterion normalises first
    crit.update_memory(emb, torch.tensor([1]))
    # video row 1: 0.5 * [0, 1] + 0.5 * [1, 0] -> [r, r]; audio row 1: 0.5 * [cos60, sin60] + 0.5 * [0, 1]
    r = 1 / math.sqrt(2)
    assert crit.video_memory.memory[1].tolist() == pytest.approx([r, r])
    mixed = [0.5 * audio_mem[1][0], 0.5 * audio_mem[1][1] + 0.5]
    norm = math.hypot(*mixed)
    assert crit.audio_memory.memory[1].tolist() == pytest.approx([mixed[0] / norm, mixed[1] / norm])
    assert crit.video_memory.memory[0].tolist() == pytest.approx(video_mem[0])


def test_avid_rejects_positive_configs_and_bad_inputs():
    with pytest.raises(ValueError, match="CMACriterion"):
        AVIDCriterion("InstX-N1024-PosW-N64-Top32", num_items=100, embedding_dim=8)
    crit = AVIDCriterion("Cross-N4", num_items=10, embedding_dim=2)
    with pytest.raises(ValueError, match="indices"):
        crit(_embeddings([[1.0, 0.0]], [[1.0, 0.0]]), torch.tensor([10]))
    with pytest.raises(ValueError, match="emb.visual"):
        crit(_embeddings([[1.0, 0.0]], [[1.0, 0.0, 0.0]]), torch.tensor([1]))


def test_state_dict_round_trip_restores_memory_and_sampling():
    crit = AVIDCriterion("Cross-N8", num_items=20, embedding_dim=4, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = crit.video_memory.sample_negatives(torch.arange(3), 8, crit.generator)

    resumed = AVIDCriterion("Cross-N8", num_items=20, embedding_dim=4, generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.video_memory.memory, crit.video_memory.memory)
    assert torch.equal(resumed.video_memory.sample_negatives(torch.arange(3), 8, resumed.generator), expected)


# ---- CMA -----------------------------------------------------------------------------------------

# Hand-made bank, 6 items on the unit circle (angles in degrees). For item 0:
#   video cos-sims to items 1..5: cos10=.985, cos5=.996, cos90=0, cos95=-.087, cos180=-1
#   audio cos-sims to items 1..5: cos10=.985, cos120=-.5, cos4=.998, cos200=-.940, cos300=.5
#   consensus = min: .985, -.5, 0, -.940, -1  -> top-1 {1}, top-2 {1, 3}
#   union = max:     .985, .996, .998, -.087, .5 -> top-2 {2, 3}
#   video alone: top-1 {2};  audio alone: top-1 {3}
VIDEO_ANGLES = [0, 10, 5, 90, 95, 180]
AUDIO_ANGLES = [0, 10, 120, 4, 200, 300]


def _cma(pos_k, sampling="consensus", num_items=6, **kw):
    cfg = AVIDConfig(name="test", num_negatives=2, xmodal_inst_coeff=1.0, wmodal_pos_coeff=1.0,
                     num_negatives_within=1, pos_k=pos_k, sampling=sampling, resample_freq=kw.pop("resample_freq", 5))
    return CMACriterion(cfg, num_items=num_items, embedding_dim=2, generator=torch.Generator().manual_seed(0))


def _load_angles(crit):
    crit.video_memory.memory.copy_(torch.tensor([_unit(a) for a in VIDEO_ANGLES]))
    crit.audio_memory.memory.copy_(torch.tensor([_unit(a) for a in AUDIO_ANGLES]))


@pytest.mark.parametrize(
    ("sampling", "pos_k", "expected_for_item0"),
    [("consensus", 1, [1]), ("consensus", 2, [1, 3]), ("video", 1, [2]), ("audio", 1, [3]), ("union", 2, [2, 3])],
)
def test_cma_positive_set_on_hand_made_bank(sampling, pos_k, expected_for_item0):
    crit = _cma(pos_k, sampling)
    _load_angles(crit)
    positives = crit.refresh_positives()
    assert positives.shape == (6, pos_k)
    assert positives[0].tolist() == expected_for_item0
    assert all(i not in positives[i].tolist() for i in range(6))  # never its own positive


def test_cma_loss_by_hand():
    crit = _cma(pos_k=1)
    _load_angles(crit)
    # Item 0 -> 1 (see the table above); item 1: video sims {0: .985, 2: .996, ...},
    # audio sims {0: .985, 2: -.342, 3: .995, ...}; the minimum is largest for item 0.
    crit.refresh_positives()
    assert crit.positive_set[1].tolist() == [0]
    video_mem = [_unit(a) for a in VIDEO_ANGLES]
    audio_mem = [_unit(a) for a in AUDIO_ANGLES]
    visual = [_unit(15), _unit(170)]
    audio = [_unit(-20), _unit(50)]
    indices, positives, negatives = [0, 1], [[1], [0]], [[4, 5], [3, 2]]
    loss, stats = crit(_embeddings(audio, visual), torch.tensor(indices), negative_indices=torch.tensor(negatives))

    s = lambda x, m: _dot(x, m) / T  # noqa: E731
    inst_v2a_neg = [[s(visual[b], audio_mem[j]) for j in negatives[b]] for b in range(2)]
    z = sum(math.exp(x) for row in inst_v2a_neg for x in row) / 4  # Z from the first task (inst-v2a)
    inst_v2a = sum(_nce_by_hand([s(visual[b], audio_mem[indices[b]])], inst_v2a_neg[b], z) for b in range(2)) / 2
    inst_a2v_neg = [[s(audio[b], video_mem[j]) for j in negatives[b]] for b in range(2)]
    inst_a2v = sum(_nce_by_hand([s(audio[b], video_mem[indices[b]])], inst_a2v_neg[b], z) for b in range(2)) / 2
    # Within-modal positive terms: the positives' memory of the same modality, first
    # num_negatives_within (= 1) negatives only.
    pos_v2v = sum(
        _nce_by_hand([s(visual[b], video_mem[p]) for p in positives[b]], [s(visual[b], video_mem[negatives[b][0]])], z)
        for b in range(2)
    ) / 2
    pos_a2a = sum(
        _nce_by_hand([s(audio[b], audio_mem[p]) for p in positives[b]], [s(audio[b], audio_mem[negatives[b][0]])], z)
        for b in range(2)
    ) / 2
    assert stats["partition"].item() == pytest.approx(z, rel=1e-5)
    assert stats["loss/wmodal_pos/v2v"].item() == pytest.approx(pos_v2v, rel=1e-5)
    assert stats["loss/wmodal_pos/a2a"].item() == pytest.approx(pos_a2a, rel=1e-5)
    # xModalInstCoeff = wModalPosCoeff = 1 -> 0.5 each; each group is the mean of its two directions.
    expected = 0.5 * (inst_v2a + inst_a2v) / 2 + 0.5 * (pos_v2v + pos_a2a) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cma_resamples_positives_at_the_official_cadence():
    crit = _cma(pos_k=1, resample_freq=5)
    _load_angles(crit)
    crit.refresh_positives()
    before = crit.positive_set.clone()
    # Move item 3 next to item 0 in both modalities: consensus top-1 of item 0 becomes 3.
    crit.video_memory.memory[3] = torch.tensor(_unit(1))
    crit.audio_memory.memory[3] = torch.tensor(_unit(1))
    for epoch in (0, 3, 4):
        crit.set_epoch(epoch)
        assert torch.equal(crit.positive_set, before)
    crit.set_epoch(5)
    assert crit.positive_set[0].tolist() == [3]


def test_cma_from_avid_keeps_memory_and_partition():
    avid = AVIDCriterion("Cross-N2", num_items=6, embedding_dim=2)
    avid.video_memory.memory.copy_(torch.tensor([_unit(a) for a in VIDEO_ANGLES]))
    avid.audio_memory.memory.copy_(torch.tensor([_unit(a) for a in AUDIO_ANGLES]))
    avid.partition.fill_(3.25)
    cfg = AVIDConfig(name="t", num_negatives=2, wmodal_pos_coeff=1.0, num_negatives_within=1, pos_k=2)
    cma = CMACriterion.from_avid(avid, cfg)
    assert torch.equal(cma.video_memory.memory, avid.video_memory.memory)
    assert cma.partition.item() == 3.25
    assert cma.positive_set[0].tolist() == [1, 3]


def test_cma_needs_a_positive_set():
    with pytest.raises(ValueError, match="AVIDCriterion"):
        CMACriterion("Cross-N8", num_items=10, embedding_dim=2)
    with pytest.raises(ValueError, match="pos_k"):
        CMACriterion("InstX-N8-PosW-N4-Top9", num_items=10, embedding_dim=2)


# ---- config names --------------------------------------------------------------------------------


def test_parse_official_names():
    cross = parse_avid_config("Cross-N1024")
    assert (cross.num_negatives, cross.xmodal_inst_coeff, cross.wmodal_inst_coeff, cross.pos_k) == (1024, 1.0, 0.0, 0)
    assert (cross.momentum, cross.temperature) == (0.5, 0.07)
    cma = parse_avid_config("InstX-N1024-PosW-N64-Top32")
    assert (cma.num_negatives, cma.num_negatives_within, cma.pos_k) == (1024, 64, 32)
    assert (cma.sampling, cma.resample_freq) == ("consensus", 5)
    coeffs = (cma.xmodal_inst_coeff, cma.wmodal_inst_coeff, cma.xmodal_pos_coeff, cma.wmodal_pos_coeff)
    assert coeffs == (1.0, 0.0, 0.0, 1.0)
    joint, self_ = parse_avid_config("Joint-N512"), parse_avid_config("Self-N256")
    assert (joint.xmodal_inst_coeff, joint.wmodal_inst_coeff) == (1.0, 1.0)
    assert (self_.xmodal_inst_coeff, self_.wmodal_inst_coeff) == (0.0, 1.0)
    assert parse_avid_config("InstX-N64-PosXW-N16-Top8-Union").sampling == "union"


@pytest.mark.parametrize(
    ("name", "bad_part"),
    [
        ("Crossmodal-N1024", "'Crossmodal'"),
        ("Cross-1024", "'1024'"),
        ("Cross-N0", "'N0'"),
        ("InstX-N1024-PosQ-N64-Top32", "'PosQ'"),
        ("InstX-N1024-PosW-N64-K32", "'K32'"),
        ("InstX-N1024-PosW-N64-Top32-Best", "'Best'"),
        ("InstX-N1024-PosW-N64", "'PosW'"),
    ],
)
def test_parse_errors_name_the_bad_part(name, bad_part):
    with pytest.raises(ValueError, match=bad_part):
        parse_avid_config(name)


# ---- model ---------------------------------------------------------------------------------------


def test_avid_model_shapes_and_backward():
    torch.manual_seed(0)
    model = build_avid_model("resnet10", "resnet10", width=8, embedding_dim=16)
    audio, visual = torch.randn(3, 1, 32, 20), torch.randn(3, 3, 2, 32, 32)
    emb = model(audio, visual)
    assert emb.audio.shape == emb.visual.shape == (3, 16)
    assert torch.allclose(emb.audio.norm(dim=1), torch.ones(3))
    assert torch.allclose(emb.visual.norm(dim=1), torch.ones(3))
    assert emb.features_audio.shape == (3, model.audio_encoder.out_dim)
    assert emb.features_visual.shape == (3, model.visual_encoder.out_dim)
    crit = AVIDCriterion("Cross-N16", num_items=10, embedding_dim=16, generator=torch.Generator().manual_seed(0))
    loss, _ = crit(emb, torch.tensor([0, 4, 7]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    crit.update_memory(AVEmbeddings(*(x.detach() for x in emb)), torch.tensor([0, 4, 7]))
    assert torch.allclose(crit.video_memory.memory.norm(dim=1), torch.ones(10))


# ---- linear probe --------------------------------------------------------------------------------


def test_linear_probe_separable_features_reach_high_accuracy():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 4

    def sample(n):
        y = torch.randint(0, 3, (n,), generator=gen)
        return centers[y] + torch.randn(n, 16, generator=gen), y

    xtr, ytr = sample(300)
    xev, yev = sample(300)
    acc = linear_probe_accuracy(xtr * 50 + 7, ytr, xev * 50 + 7, yev, num_classes=3, epochs=100, seed=0)
    assert acc > 0.97
    assert acc == linear_probe_accuracy(xtr * 50 + 7, ytr, xev * 50 + 7, yev, num_classes=3, epochs=100, seed=0)


def test_linear_probe_random_labels_give_chance():
    gen = torch.Generator().manual_seed(1)
    xtr, xev = torch.randn(400, 32, generator=gen), torch.randn(2000, 32, generator=gen)
    ytr, yev = torch.randint(0, 4, (400,), generator=gen), torch.randint(0, 4, (2000,), generator=gen)
    acc = linear_probe_accuracy(xtr, ytr, xev, yev, num_classes=4, epochs=100, seed=0)
    assert abs(acc - 0.25) < 0.06


def test_linear_probe_input_errors():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="eval_labels"):
        linear_probe_accuracy(x, y, x, torch.tensor([0, 1, 0, 5]), num_classes=2)
    with pytest.raises(ValueError, match="dims"):
        linear_probe_accuracy(x, y, torch.randn(4, 2), y, num_classes=2)
