"""OGM-GE: coefficients, modulation window, gradient modulation and GE noise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    AVClassifier,
    OGMCoefficients,
    build_audio_encoder,
    build_visual_encoder,
    in_modulation_window,
    modality_scores,
    modulate_gradients,
    ogm_coefficients,
    ogm_coefficients_from_scores,
)

E = math.e
LABELS = torch.tensor([0, 1])
# Audio: sample 0 has logits (2, 0, 0), label 0; sample 1 has (0, 1, 0), label 1.
AUDIO = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# Visual: sample 0 has (0, 0, 0), label 0; sample 1 has (0, 3, 0), label 1.
VISUAL = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
S_A = E**2 / (E**2 + 2) + E / (E + 2)  # 0.7870 + 0.5761
S_V = 1 / 3 + E**3 / (E**3 + 2)  # 0.3333 + 0.9094


def test_scores_by_hand():
    s_a, s_v = modality_scores(AUDIO, VISUAL, LABELS)
    assert s_a.item() == pytest.approx(S_A, rel=1e-6)
    assert s_v.item() == pytest.approx(S_V, rel=1e-6)


def test_audio_dominant_coefficients_by_hand():
    alpha = 0.8
    assert S_A > S_V  # so rho_v = s_v / s_a < 1: audio dominates
    c = ogm_coefficients(AUDIO, VISUAL, LABELS, alpha)
    assert c.k_audio.item() == pytest.approx(1 - math.tanh(alpha * S_A / S_V), rel=1e-6)
    assert c.k_visual.item() == 1.0
    assert c.ratio_av.item() == pytest.approx(S_A / S_V, rel=1e-6)
    assert c.k_audio.dim() == c.k_visual.dim() == c.ratio_av.dim() == 0


def test_visual_dominant_coefficients_by_hand():
    alpha = 0.3
    c = ogm_coefficients(VISUAL, AUDIO, LABELS, alpha)  # roles swapped
    assert c.k_visual.item() == pytest.approx(1 - math.tanh(alpha * S_A / S_V), rel=1e-6)
    assert c.k_audio.item() == 1.0
    assert c.ratio_av.item() == pytest.approx(S_V / S_A, rel=1e-6)


def test_tie_damps_audio_like_official_code():
    # Official main.py: `if ratio_v > 1: ... else: coeff_a = 1 - tanh(alpha * relu(ratio_a))`.
    c = ogm_coefficients(AUDIO, AUDIO.clone(), LABELS, alpha=0.5)
    assert c.k_audio.item() == pytest.approx(1 - math.tanh(0.5), rel=1e-6)
    assert c.k_visual.item() == 1.0


def test_alpha_zero_disables_and_bad_inputs_raise():
    c = ogm_coefficients(AUDIO, VISUAL, LABELS, alpha=0.0)
    assert c.k_audio.item() == c.k_visual.item() == 1.0
    with pytest.raises(ValueError, match="alpha"):
        ogm_coefficients(AUDIO, VISUAL, LABELS, alpha=-1.0)
    with pytest.raises(ValueError, match="labels"):
        ogm_coefficients(AUDIO, VISUAL, torch.tensor([0, 1, 2]), alpha=1.0)
    with pytest.raises(ValueError, match="logits_audio and logits_visual"):
        ogm_coefficients(AUDIO, VISUAL[:, :2], LABELS, alpha=1.0)


def test_coefficients_from_scores_and_no_grad():
    c = ogm_coefficients_from_scores(torch.tensor(1.0), torch.tensor(3.0), alpha=0.1)
    assert c.k_visual.item() == pytest.approx(1 - math.tanh(0.1 * 3.0), rel=1e-6)
    assert c.k_audio.item() == 1.0
    assert c.ratio_av.item() == pytest.approx(1 / 3, rel=1e-6)
    logits = AUDIO.clone().requires_grad_(True)
    assert not ogm_coefficients(logits, VISUAL, LABELS, 1.0).k_audio.requires_grad
    # Fully underflowed scores give a tie, not NaN.
    c0 = ogm_coefficients_from_scores(torch.tensor(0.0), torch.tensor(0.0), alpha=1.0)
    assert c0.k_audio.item() == pytest.approx(1 - math.tanh(1.0), rel=1e-6)


# ---------------------------------------------------------------- window


def test_window_edges_half_open():
    starts, ends = 2, 5
    assert not in_modulation_window(starts - 1, starts, ends)
    assert in_modulation_window(starts, starts, ends)
    assert in_modulation_window(ends - 1, starts, ends)
    assert not in_modulation_window(ends, starts, ends)
    assert [e for e in range(8) if in_modulation_window(e, starts, ends)] == [2, 3, 4]


def test_window_inclusive_end_reproduces_official_head():
    # OGM-GE_CVPR2022/main.py HEAD: `if args.modulation_starts <= epoch <= args.modulation_ends`.
    assert in_modulation_window(5, 2, 5, inclusive_end=True)
    assert not in_modulation_window(6, 2, 5, inclusive_end=True)
    assert not in_modulation_window(1, 2, 5, inclusive_end=True)


def test_window_validation():
    assert not any(in_modulation_window(e, 3, 3) for e in range(6))
    with pytest.raises(ValueError, match="starts=4 > ends=3"):
        in_modulation_window(0, 4, 3)
    with pytest.raises(ValueError, match="epoch"):
        in_modulation_window(-1, 0, 3)


# ---------------------------------------------------------------- modulation


def _encoder(conv: nn.Module) -> nn.Module:
    return nn.Sequential(conv, nn.BatchNorm2d(4) if isinstance(conv, nn.Conv2d) else nn.Identity(), nn.Linear(3, 3))


def _fill_grads(module: nn.Module, value: float) -> dict[str, torch.Tensor]:
    for i, p in enumerate(module.parameters()):
        p.grad = torch.full_like(p, value + i)
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_ogm_scales_only_dominant_encoders_conv_weights():
    audio = _encoder(nn.Conv2d(2, 4, 3, bias=True))
    visual = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv1d(2, 2, 3), nn.Linear(3, 3))
    before_a, before_v = _fill_grads(audio, 1.0), _fill_grads(visual, 2.0)
    coeffs = OGMCoefficients(torch.tensor(0.25), torch.tensor(1.0), torch.tensor(2.0))
    modulate_gradients(audio, visual, coeffs, gaussian_enhance=False)
    after_a = {n: p.grad for n, p in audio.named_parameters()}
    torch.testing.assert_close(after_a["0.weight"], 0.25 * before_a["0.weight"])
    for name in ("0.bias", "1.weight", "1.bias", "2.weight", "2.bias"):  # conv bias, BN, Linear untouched
        torch.testing.assert_close(after_a[name], before_a[name])
    for name, p in visual.named_parameters():
        torch.testing.assert_close(p.grad, before_v[name])
    # The other way round: Conv3d and Conv1d weights (5-D, 3-D) are scaled too.
    coeffs = OGMCoefficients(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.5))
    modulate_gradients(audio, visual, coeffs, gaussian_enhance=False)
    grads_v = {n: p.grad for n, p in visual.named_parameters()}
    torch.testing.assert_close(grads_v["0.weight"], 0.5 * before_v["0.weight"])
    torch.testing.assert_close(grads_v["1.weight"], 0.5 * before_v["1.weight"])
    torch.testing.assert_close(grads_v["0.bias"], before_v["0.bias"])
    torch.testing.assert_close(grads_v["2.weight"], before_v["2.weight"])
    torch.testing.assert_close(audio[0].weight.grad, 0.25 * before_a["0.weight"])  # unchanged by 2nd call


def test_missing_grads_are_skipped():
    audio, visual = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3)
    visual.weight.grad = torch.ones_like(visual.weight)
    coeffs = OGMCoefficients(torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0))
    modulate_gradients(audio, visual, coeffs, gaussian_enhance=True, generator=torch.Generator().manual_seed(0))
    assert audio.weight.grad is None
    assert visual.weight.grad.shape == visual.weight.shape


def test_ge_noise_statistics_use_unscaled_gradient_std():
    torch.manual_seed(0)
    audio, visual = nn.Conv2d(32, 32, 5, bias=False), nn.Conv2d(32, 32, 5, bias=False)  # 25,600 weights each
    g_a = torch.randn_like(audio.weight) * 3.0 + 1.0
    g_v = torch.randn_like(visual.weight) * 0.2 - 0.5
    audio.weight.grad, visual.weight.grad = g_a.clone(), g_v.clone()
    k_a = 0.25
    coeffs = OGMCoefficients(torch.tensor(k_a), torch.tensor(1.0), torch.tensor(3.0))
    modulate_gradients(audio, visual, coeffs, gaussian_enhance=True, generator=torch.Generator().manual_seed(7))
    n = g_a.numel()
    for new, orig, k in ((audio.weight.grad, g_a, k_a), (visual.weight.grad, g_v, 1.0)):
        noise = new - k * orig
        sigma = orig.std().item()  # std of the gradient *before* scaling by k
        assert abs(noise.mean().item()) < 5 * sigma / math.sqrt(n)
        assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    # Noise uses the unscaled std: for audio it is ~4x the std of k * g.
    assert (audio.weight.grad - k_a * g_a).std().item() > 3 * (k_a * g_a).std().item()


def test_ge_noise_is_reproducible_with_generator():
    def run(seed: int) -> torch.Tensor:
        audio, visual = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        for m in (audio, visual):
            m.weight.grad = torch.linspace(-1, 1, m.weight.numel()).reshape(m.weight.shape)
        coeffs = OGMCoefficients(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(2.0))
        modulate_gradients(audio, visual, coeffs, gaussian_enhance=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([audio.weight.grad.flatten(), visual.weight.grad.flatten()])

    torch.testing.assert_close(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_modulation_on_av_classifier_after_backward():
    torch.manual_seed(0)
    model = AVClassifier(build_audio_encoder("resnet10", 4), build_visual_encoder("r2plus1d", 4), "concat", 3)
    out = model(torch.randn(2, 1, 64, 32), torch.randn(2, 3, 2, 32, 32))
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    coeffs = OGMCoefficients(torch.tensor(1.0), torch.tensor(0.3), torch.tensor(0.2))
    modulate_gradients(model.audio_encoder, model.visual_encoder, coeffs, gaussian_enhance=False)
    scaled = 0
    for name, p in model.named_parameters():
        is_visual_conv = name.startswith("visual_encoder.") and p.dim() == 5
        expected = 0.3 * before[name] if is_visual_conv else before[name]
        torch.testing.assert_close(p.grad, expected, msg=name)
        scaled += is_visual_conv
    assert scaled > 10  # stem + every (2+1)D conv + downsample convs


@pytest.mark.parametrize("name", ["ogm_ge_cremad", "ogm_ge_kinetics_sounds", "ogm_ge_vggsound"])
def test_paper_specs_modulate_the_official_epochs(name):
    """Official main.py (HEAD) modulates `modulation_starts <= epoch <= modulation_ends` with its
    defaults 0 and 50; a paper spec must modulate exactly those epochs of its run."""
    from orchestrator.specs import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    m = spec.method
    ours = [e for e in range(spec.train.epochs) if in_modulation_window(e, m.modulation_starts, m.modulation_ends)]
    official = [e for e in range(spec.train.epochs) if 0 <= e <= 50]
    assert ours == official


@pytest.mark.parametrize("fusion,source", [("sum", "fusion_logits"), ("concat", "fusion_logits"),
                                           ("film", "probe_heads"), ("gated", "probe_heads")])
def test_ogm_runs_say_which_scores_they_used(fusion, source):
    from orchestrator.specs import load_spec
    from workers.methods import get_method

    spec = load_spec({"method": {"name": "ogm_ge"}, "model": {"fusion": fusion}})
    assert get_method("ogm_ge").run_params(spec) == {"ogm_scores_from": source}
    # and the models agree: probe heads exactly where the run says so
    model = get_method("ogm_ge")(spec, None).build_model(num_classes=3)
    assert model.has_probe_heads == (source == "probe_heads")
