"""Tests for models/avslowfast.py (Audiovisual SlowFast, Xiao et al. 2020)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.avslowfast import (
    AVSLOWFAST_CONFIGS,
    DropPathway,
    _AudioToVisual,
    build_avslowfast,
    drop_pathway,
)
from models.outputs import AVOutput


def _tiny(num_classes: int = 3, **kw):
    torch.manual_seed(0)
    return build_avslowfast(num_classes, config="tiny", **kw)


# ---- DropPathway ---------------------------------------------------------------------------------


def test_drop_pathway_drops_at_the_given_rate_in_training():
    module = DropPathway(0.8).train()
    torch.manual_seed(0)
    draws = [module.sample_keep() for _ in range(4000)]
    assert set(draws) == {0.0, 1.0}
    dropped = draws.count(0.0) / len(draws)
    # Binomial(4000, 0.8): std = sqrt(0.8 * 0.2 / 4000) ~ 0.0063; 4 std is 0.025.
    assert abs(dropped - 0.8) < 0.025

    module = DropPathway(0.3).train()
    torch.manual_seed(1)
    dropped = [module.sample_keep() for _ in range(4000)].count(0.0) / 4000
    assert abs(dropped - 0.3) < 0.03


def test_drop_pathway_is_identity_in_eval_and_seedable():
    x = torch.randn(4, 5)
    module = DropPathway(1.0).eval()
    assert all(module.sample_keep() == 1.0 for _ in range(100))
    assert module(x) is x
    assert drop_pathway(x, 1.0, training=False) is x
    assert torch.equal(drop_pathway(x, 1.0, training=True), torch.zeros_like(x))
    assert drop_pathway(x, 0.0, training=True) is x

    # A passed generator makes the draws reproducible, independent of the global RNG.
    a = DropPathway(0.5, generator=torch.Generator().manual_seed(7)).train()
    b = DropPathway(0.5, generator=torch.Generator().manual_seed(7)).train()
    assert [a.sample_keep() for _ in range(50)] == [b.sample_keep() for _ in range(50)]


def test_drop_pathway_rejects_bad_rate():
    with pytest.raises(ValueError, match="drop_pathway_rate"):
        DropPathway(1.5)
    with pytest.raises(ValueError, match="drop_pathway_rate"):
        build_avslowfast(3, config="tiny", drop_pathway_rate=-0.1)


def test_default_drop_rate_is_the_official_constant():
    # slowfast/config/defaults.py: _C.SLOWFAST.DROPPATHWAY_RATE = 0.8
    assert build_avslowfast(3).drop_pathway_rate == 0.8


# ---- tiny network ----------------------------------------------------------------------------------


def test_tiny_forward_shapes_and_every_parameter_gets_a_gradient():
    model = _tiny(num_classes=3).train()
    audio, visual = model.example_inputs(batch_size=2)
    assert audio.shape == (2, 1, 64, 40) and visual.shape == (2, 3, 8, 64, 64)
    out = model(audio, visual)
    assert isinstance(out, AVOutput)
    assert out.logits.shape == out.logits_audio.shape == out.logits_visual.shape == (2, 3)
    labels = torch.tensor([0, 2])
    loss = sum(F.cross_entropy(x, labels) for x in out)
    loss.backward()
    # DDP without find_unused_parameters needs every parameter in the graph, whatever DropPathway drew.
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.has_probe_heads is True


def test_probe_heads_read_detached_features():
    model = _tiny().train()
    audio, visual = model.example_inputs(batch_size=2)
    out = model(audio, visual)
    labels = torch.tensor([1, 0])
    (F.cross_entropy(out.logits_audio, labels) + F.cross_entropy(out.logits_visual, labels)).backward()
    assert model.probe_audio.weight.grad is not None and model.probe_visual.weight.grad is not None
    trunk = list(model.audio_encoder.parameters()) + list(model.visual_encoder.parameters())
    assert all(p.grad is None for p in trunk)
    assert model.head.weight.grad is None


def test_dropped_audio_sums_zeros_into_the_visual_pathway():
    model = _tiny(drop_pathway_rate=1.0).train()
    audio, visual = model.example_inputs(batch_size=2)
    other_audio = torch.randn_like(audio) * 3
    slow_a, fast_a, aud_a = model.forward_features(audio, visual)
    slow_b, fast_b, aud_b = model.forward_features(other_audio, visual)
    assert torch.allclose(slow_a, slow_b) and torch.allclose(fast_a, fast_b)
    assert not torch.allclose(aud_a, aud_b)

    # The lateral is multiplied by zero, not skipped: its parameters get (zero) gradients.
    model.zero_grad()
    model(audio, visual).logits.sum().backward()
    lateral = list(model.audio_to_visual.named_parameters())
    assert lateral and all(p.grad is not None for _, p in lateral)
    assert all(torch.count_nonzero(p.grad) == 0 for _, p in lateral)


def test_kept_audio_reaches_the_visual_pathway_in_training_and_eval():
    model = _tiny(drop_pathway_rate=0.0).train()
    audio, visual = model.example_inputs(batch_size=2)
    other_audio = torch.randn_like(audio) * 3
    assert not torch.allclose(model.forward_features(audio, visual)[0], model.forward_features(other_audio, visual)[0])

    # Eval: DropPathway is the identity even at rate 1.0.
    model = _tiny(drop_pathway_rate=1.0).eval()
    with torch.no_grad():
        slow_a = model.forward_features(audio, visual)[0]
        assert not torch.allclose(slow_a, model.forward_features(other_audio, visual)[0])


def test_slow_pathway_takes_linspace_frames():
    # pack_pathway_output: linspace(0, T - 1, T // alpha).long(); T=8, alpha=4 -> frames [0, 7].
    model = _tiny().eval()
    seen = {}
    model.visual_encoder["slow_stem"].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    audio, _ = model.example_inputs(batch_size=1)
    visual = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 64, 64).contiguous()
    with torch.no_grad():
        model(audio, visual)
    assert seen["x"].shape == (1, 3, 2, 64, 64)
    assert seen["x"][0, 0, :, 0, 0].tolist() == [0.0, 7.0]


def test_audio_to_visual_lateral_matches_slow_length():
    lateral = _AudioToVisual(dim_audio=16, dim_out=12, channel_ratio=0.125, kernel=5, num_convs=2).eval()
    assert lateral.convs[0].out_channels == 2  # official ByRatio: int(16 * 0.125)
    # Exact multiple: stride = 64 / 2 = 32 (official AU_ALPHA), no resampling.
    assert lateral(torch.randn(2, 16, 64, 10), slow_frames=2).shape == (2, 12, 2, 1, 1)
    # Not a multiple: stride 30 // 4 = 7 gives 5 steps, pooled to the 4 Slow frames.
    assert lateral(torch.randn(2, 16, 30, 10), slow_frames=4).shape == (2, 12, 4, 1, 1)


def test_tiny_fits_a_small_batch():
    model = _tiny(num_classes=2)
    audio, visual = model.example_inputs(batch_size=8)
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(20):
        out = model(audio, visual)
        loss = F.cross_entropy(out.logits, labels)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        (loss + F.cross_entropy(out.logits_audio, labels) + F.cross_entropy(out.logits_visual, labels)).backward()
        optimizer.step()
    assert loss.item() < 0.25 * first
    model.eval()
    with torch.no_grad():
        assert (model(audio, visual).logits.argmax(1) == labels).all()


def test_channels_last_conversion_keeps_outputs():
    model = _tiny().eval()
    audio, visual = model.example_inputs(batch_size=2)
    with torch.no_grad():
        before = model(audio, visual).logits
        model.to_channels_last()
        after = model(audio, visual).logits
    conv3d = model.visual_encoder["slow_stem"].conv.weight
    conv2d = model.audio_encoder["stem"].conv_time.weight
    assert conv3d.is_contiguous(memory_format=torch.channels_last_3d)
    assert conv2d.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(before, after, atol=1e-5)


def test_input_errors_name_the_problem():
    model = _tiny()
    audio, visual = model.example_inputs(batch_size=2)
    with pytest.raises(ValueError, match="alpha=4"):
        model(audio, visual[:, :, :6])
    with pytest.raises(ValueError, match="audio"):
        model(audio[:, 0], visual)
    with pytest.raises(ValueError, match="visual"):
        model(audio, visual[:, :, 0])
    with pytest.raises(ValueError, match="batch sizes"):
        model(audio[:1], visual)
    with pytest.raises(ValueError, match="config"):
        build_avslowfast(3, config="huge")


# ---- paper configuration -------------------------------------------------------------------------


def test_paper_config_structure_and_shapes():
    cfg = AVSLOWFAST_CONFIGS["paper"]
    assert cfg.stage_depths == (3, 4, 6, 3) and cfg.alpha == 4 and cfg.beta_inv == 8 and cfg.audio_beta_inv == 2
    torch.manual_seed(0)
    model = build_avslowfast(400, config="paper").eval()
    assert (model.slow_dim, model.fast_dim, model.audio_dim) == (2048, 256, 1024)
    # The configured log-mel (128 x 80) and 32 frames, on a small crop to stay fast.
    audio, visual = model.example_inputs(batch_size=1, crop_size=64)
    assert audio.shape == (1, 1, 128, 80) and visual.shape[2] == 32
    with torch.no_grad():
        out = model(audio, visual)
    assert out.logits.shape == out.logits_audio.shape == out.logits_visual.shape == (1, 400)
    assert torch.isfinite(out.logits).all()


def junction_laterals(model) -> list[tuple[bool, bool]]:
    """(Fast->Slow lateral, Audio->(Fast, Slow) lateral) present at each junction."""
    f2s, a2v = model.visual_encoder["fast_to_slow"], model.audio_to_visual
    return [(not isinstance(f, torch.nn.Identity), not isinstance(a, torch.nn.Identity)) for f, a in zip(f2s, a2v)]


def test_paper_config_fuses_where_the_official_configs_fuse():
    """configs/Kinetics/AVSLOWFAST_8x8_R50.yaml (and _4x16_): FS_FUSION = AFS_FUSION = [False, False,
    True, True], AU_FUSION_CONV_CHANNEL_MODE ByDim, AU_FUSION_CONV_CHANNEL_DIM 64."""
    model = build_avslowfast(400, config="paper")
    assert junction_laterals(model) == [(False, False), (False, False), (True, True), (True, True)]
    # No lateral before res2 / res3: those stages take the Slow pathway's own width.
    slow_stages = model.visual_encoder["slow_stages"]
    assert [stage[0].conv_a.in_channels for stage in slow_stages] == [64, 256, 512 + 64 * 2, 1024 + 128 * 2]
    # The A->FS laterals: ByDim 64 intermediate channels, then the fused Slow width.
    for junction, fused in ((2, 512 + 128), (3, 1024 + 256)):
        convs = model.audio_to_visual[junction].convs
        assert [(c.in_channels, c.out_channels) for c in convs] == [(model_audio_width(junction), 64), (64, fused)]
    # Fewer laterals, fewer parameters than SlowFast R50's fusion at all four junctions (34.57 M with a
    # 400-way head, pytorchvideo model_zoo): the same network with every junction fused has exactly that.
    everywhere = build_avslowfast(400, config="paper", fusion_junctions=(True, True, True, True))
    visual = sum(p.numel() for p in everywhere.visual_encoder.parameters()) + (2048 + 256) * 400 + 400
    assert abs(visual / 1e6 - 34.57) < 0.005
    assert sum(p.numel() for p in model.visual_encoder.parameters()) < sum(
        p.numel() for p in everywhere.visual_encoder.parameters())


def model_audio_width(junction: int) -> int:
    """Audio pathway channels entering junction i of the paper config: stem 32, then res_i outputs."""
    return 32 if junction == 0 else 64 * 4 * 2 ** (junction - 1) // 2


def test_fusion_junctions_override_and_tiny_default():
    assert junction_laterals(build_avslowfast(3, config="tiny")) == [(True, True), (True, True)]
    late = build_avslowfast(3, config="tiny", fusion_junctions=(False, True))
    assert junction_laterals(late) == [(False, False), (True, True)]
    audio, visual = late.example_inputs(batch_size=2)
    assert late(audio, visual).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="2 junctions"):
        build_avslowfast(3, config="tiny", fusion_junctions=(True, True, True))


def test_spec_field_reaches_the_model_and_names_its_junction_count():
    from orchestrator.specs import SpecError, load_spec
    from workers.methods import get_method
    from workers.methods.avslowfast import JUNCTIONS

    assert JUNCTIONS == {name: len(cfg.stage_depths) for name, cfg in AVSLOWFAST_CONFIGS.items()}
    spec = load_spec({"method": {"name": "avslowfast", "fusion_junctions": [False, True]},
                      "data": {"decode": {"num_frames": 8}}})
    model = get_method("avslowfast")(spec, None).build_model(num_classes=3)
    assert junction_laterals(model) == [(False, False), (True, True)]
    with pytest.raises(SpecError, match=r"method\.fusion_junctions: the paper config has 4 junctions"):
        load_spec({"method": {"name": "avslowfast", "config": "paper", "fusion_junctions": [True, True]},
                   "data": {"decode": {"num_frames": 8}}})
