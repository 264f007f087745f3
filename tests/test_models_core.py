"""Encoders, fusion heads, AVClassifier and uni-modal baselines (tiny widths, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import (
    AUDIO_ARCHS,
    FUSION_NAMES,
    VISUAL_ARCHS,
    AVClassifier,
    AVOutput,
    build_audio_encoder,
    build_av_classifier,
    build_fusion,
    build_unimodal_classifier,
    build_visual_encoder,
)
from models.encoders import _RESNET2D_BLOCKS, _init_conv_bn, _r2plus1d_stem, _r3d_stem
from models.fusion import ConcatFusion, FiLM, GatedFusion, SumFusion

K = 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("models must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def tiny_audio(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 100, 40)


def tiny_visual(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 2, 32, 32)


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("arch", AUDIO_ARCHS)
def test_audio_encoder_shape(arch):
    enc = build_audio_encoder(arch, width=8)
    assert enc.out_dim == 64
    assert enc.conv1.weight.shape == (8, 1, 7, 7)  # 1-channel stem, as OGM-GE's audio backbone
    assert enc(tiny_audio()).shape == (2, 64)


@pytest.mark.parametrize("arch", VISUAL_ARCHS)
def test_visual_encoder_shape(arch):
    enc = build_visual_encoder(arch, width=8)
    assert enc.out_dim == 64
    assert enc(tiny_visual()).shape == (2, 64)


def test_resnet10_has_one_block_per_stage():
    enc = build_audio_encoder("resnet10", width=8)
    assert [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    enc18 = build_audio_encoder("resnet18", width=8)
    assert [len(getattr(enc18, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(enc18, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [8, 16, 32, 64]


def _without_fc(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def test_width64_matches_torchvision_architectures():
    # Same parameter names and shapes as torchvision's (randomly initialised) reference nets.
    frame = build_visual_encoder("resnet18", width=64)
    frame.load_state_dict(_without_fc(torchvision.models.resnet18(weights=None).state_dict()), strict=True)
    r2p1 = build_visual_encoder("r2plus1d", width=64)
    r2p1.load_state_dict(_without_fc(torchvision.models.video.r2plus1d_18(weights=None).state_dict()), strict=True)
    r3d = build_visual_encoder("r3d", width=64)
    r3d.load_state_dict(_without_fc(torchvision.models.video.r3d_18(weights=None).state_dict()), strict=True)
    assert r2p1.out_dim == r3d.out_dim == frame.out_dim == 512


class _TorchvisionTrunk2d(torchvision.models.resnet.ResNet):
    """The 2D trunk built from torchvision's own classes (ResNet._make_layer, BasicBlock), as avtune did
    before it wrote the blocks out: the reference for the same-seed comparison below."""

    def __init__(self, blocks, in_channels, width):
        nn.Module.__init__(self)
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, width, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = torchvision.models.resnet.BasicBlock
        self.layer1 = self._make_layer(block, width, blocks[0])
        self.layer2 = self._make_layer(block, 2 * width, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, blocks[3], stride=2)
        _init_conv_bn(self)


class _TorchvisionVideoTrunk(torchvision.models.video.resnet.VideoResNet):
    def __init__(self, arch, width):
        nn.Module.__init__(self)
        video = torchvision.models.video.resnet
        conv_maker = video.Conv2Plus1D if arch == "r2plus1d" else video.Conv3DSimple
        self.stem = _r2plus1d_stem(width) if arch == "r2plus1d" else _r3d_stem(width)
        self.inplanes = width
        self.layer1 = self._make_layer(video.BasicBlock, conv_maker, width, 2, stride=1)
        self.layer2 = self._make_layer(video.BasicBlock, conv_maker, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(video.BasicBlock, conv_maker, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(video.BasicBlock, conv_maker, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        _init_conv_bn(self)


@pytest.mark.parametrize("modality,arch", [("audio", a) for a in AUDIO_ARCHS] + [("visual", a) for a in VISUAL_ARCHS])
def test_blocks_are_torchvisions_same_seed_same_weights_same_outputs(modality, arch):
    # avtune writes torchvision's blocks out (importing torchvision costs 1.5 s per process); built from
    # torchvision's classes with the same seed, the nets must hold the same tensors, in the same order,
    # and compute the same outputs: any change in module order or random-number use shows here.
    torch.manual_seed(3)
    ours = (build_audio_encoder if modality == "audio" else build_visual_encoder)(arch, width=8)
    torch.manual_seed(3)
    if arch in ("r2plus1d", "r3d"):
        reference = _TorchvisionVideoTrunk(arch, 8)
    else:
        reference = _TorchvisionTrunk2d(_RESNET2D_BLOCKS[arch], 1 if modality == "audio" else 3, 8)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    for name, tensor in ours_state.items():
        assert torch.equal(tensor, reference_state[name]), name
    x = tiny_audio() if modality == "audio" else tiny_visual()
    ours.train(), reference.train()
    if arch in ("r2plus1d", "r3d"):
        expected = reference.avgpool(reference.layer4(reference.layer3(reference.layer2(reference.layer1(reference.stem(x)))))).flatten(1)
    else:
        if modality == "audio":
            inputs = x
        else:  # frames folded into the batch, then pooled over (T, H, W), as FrameResNet does
            b, c, t, h, w = x.shape
            inputs = x.transpose(1, 2).reshape(b * t, c, h, w)
        fmap = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(inputs))))))))
        if modality == "audio":
            expected = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        else:
            expected = F.adaptive_avg_pool3d(fmap.view(b, t, *fmap.shape[1:]).transpose(1, 2), 1).flatten(1)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


def test_models_do_not_import_torchvision():
    import subprocess
    import sys

    code = "import sys, models, workers.train_loop; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_frame_encoder_pools_over_time_height_width():
    enc = build_visual_encoder("resnet10", width=8).eval()
    clip = tiny_visual(b=2)
    with torch.no_grad():
        out = enc(clip)
        # By hand: encode each frame separately, average each map over (H, W), then over frames.
        per_frame = [enc.forward_features(clip[:, :, t]).mean(dim=(2, 3)) for t in range(clip.shape[2])]
        expected = torch.stack(per_frame, dim=0).mean(dim=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_encoder_errors_name_the_problem():
    with pytest.raises(ValueError, match="audio arch must be one of"):
        build_audio_encoder("r3d")
    with pytest.raises(ValueError, match="visual arch must be one of"):
        build_visual_encoder("vit")
    with pytest.raises(ValueError, match="width"):
        build_audio_encoder("resnet10", width=0)
    with pytest.raises(ValueError, match=r"audio must have shape \(B, 1, T, F\)"):
        build_audio_encoder("resnet10", width=8)(torch.randn(2, 3, 100, 40))
    with pytest.raises(ValueError, match=r"visual must have shape \(B, 3, T, H, W\)"):
        build_visual_encoder("resnet10", width=8)(torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- fusion heads


def test_build_fusion_unknown_name():
    with pytest.raises(ValueError, match="'sum', 'concat', 'film', 'gated'.*'mult'"):
        build_fusion("mult", 8, 8, K)


def test_fusion_formulas_by_hand():
    a = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[3.0, -1.0, 0.5]])
    # Sum: fc_x(a) + fc_y(v).
    s = build_fusion("sum", 2, 3, 1)
    assert isinstance(s, SumFusion)
    with torch.no_grad():
        s.fc_x.weight.copy_(torch.tensor([[0.5, 1.0]]))
        s.fc_x.bias.fill_(0.25)
        s.fc_y.weight.copy_(torch.tensor([[1.0, 2.0, 4.0]]))
        s.fc_y.bias.fill_(-1.0)
    # 0.5*1 + 1*2 + 0.25 + (3 - 2 + 2) - 1 = 4.75
    assert s(a, v)[2].item() == pytest.approx(4.75)
    # Concat: audio columns first.
    c = build_fusion("concat", 2, 3, 1)
    assert isinstance(c, ConcatFusion)
    with torch.no_grad():
        c.fc_out.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0]]))
        c.fc_out.bias.fill_(0.5)
    # 1 + 20 + 300 - 1000 + 5000 + 0.5
    assert c(a, v)[2].item() == pytest.approx(4321.5)
    # FiLM (x_film=True): audio predicts gamma/beta for the 3-d visual features.
    f = build_fusion("film", 2, 3, 1)
    assert isinstance(f, FiLM) and f.x_film
    with torch.no_grad():
        f.fc.weight.zero_()
        f.fc.bias.copy_(torch.tensor([2.0, 0.0, 1.0, 0.5, 0.5, 0.5]))  # gamma=(2,0,1), beta=.5
        f.fc_out.weight.fill_(1.0)
        f.fc_out.bias.zero_()
    # (2*3 + .5) + (0*-1 + .5) + (1*.5 + .5) = 8
    assert f(a, v)[2].item() == pytest.approx(8.0)
    # Gated (x_gate=True): sigmoid(fc_x(a)) * fc_y(v), projected to dim = max(2, 3) = 3.
    g = build_fusion("gated", 2, 3, 1)
    assert isinstance(g, GatedFusion) and g.x_gate and g.fc_out.in_features == 3
    with torch.no_grad():
        g.fc_x.weight.zero_()
        g.fc_x.bias.copy_(torch.tensor([0.0, 100.0, -100.0]))  # gate = (.5, 1, 0)
        g.fc_y.weight.copy_(torch.eye(3))
        g.fc_y.bias.zero_()
        g.fc_out.weight.fill_(1.0)
        g.fc_out.bias.zero_()
    out_x, out_y, logits = g(a, v)
    assert logits.item() == pytest.approx(0.5 * 3.0 + 1.0 * -1.0 + 0.0)
    torch.testing.assert_close(out_y, v)  # gated returns projected features like the official module


# ---------------------------------------------------------------- AVClassifier


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_av_classifier_forward_backward(fusion):
    model = build_av_classifier(K, fusion=fusion, width=8)
    out = model(tiny_audio(), tiny_visual())
    assert isinstance(out, AVOutput)
    assert out.logits.shape == out.logits_audio.shape == out.logits_visual.shape == (2, K)
    assert model.fusion_name == fusion
    assert model.has_probe_heads == (fusion in ("film", "gated"))
    labels = torch.tensor([0, 3])
    loss = F.cross_entropy(out.logits, labels)
    if model.has_probe_heads:
        loss = loss + F.cross_entropy(out.logits_audio, labels) + F.cross_entropy(out.logits_visual, labels)
    loss.backward()
    assert model.audio_encoder.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.fusion.parameters())


def _two_width_classifier(fusion: str) -> AVClassifier:
    # Audio 64-d, visual 32-d, so a wrong split point would change the result or fail.
    return AVClassifier(build_audio_encoder("resnet10", 8), build_visual_encoder("resnet10", 4), fusion, K).eval()


def test_concat_per_modality_logits_use_own_slice_and_half_bias():
    model = _two_width_classifier("concat")
    d_a, d_v = 64, 32
    weight = torch.linspace(-1.0, 1.0, K * (d_a + d_v)).reshape(K, d_a + d_v)
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])
    with torch.no_grad():
        model.fusion.fc_out.weight.copy_(weight)
        model.fusion.fc_out.bias.copy_(bias)
        audio, visual = tiny_audio(), tiny_visual()
        a, v = model.audio_encoder(audio), model.visual_encoder(visual)
        out = model(audio, visual)
    torch.testing.assert_close(out.logits_audio, a @ weight[:, :d_a].T + bias / 2)
    torch.testing.assert_close(out.logits_visual, v @ weight[:, d_a:].T + bias / 2)
    torch.testing.assert_close(out.logits_audio + out.logits_visual, out.logits)
    assert not torch.allclose(out.logits_audio, out.logits_visual)


def test_sum_per_modality_logits_use_own_linear():
    model = _two_width_classifier("sum")
    with torch.no_grad():
        model.fusion.fc_x.bias.copy_(torch.arange(K, dtype=torch.float32))
        model.fusion.fc_y.bias.copy_(-torch.arange(K, dtype=torch.float32))
        audio, visual = tiny_audio(), tiny_visual()
        a, v = model.audio_encoder(audio), model.visual_encoder(visual)
        out = model(audio, visual)
    fc_x, fc_y = model.fusion.fc_x, model.fusion.fc_y
    torch.testing.assert_close(out.logits_audio, a @ fc_x.weight.T + fc_x.bias)
    torch.testing.assert_close(out.logits_visual, v @ fc_y.weight.T + fc_y.bias)
    torch.testing.assert_close(out.logits_audio + out.logits_visual, out.logits)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_probe_heads_do_not_train_encoders(fusion):
    model = build_av_classifier(K, fusion=fusion, audio_arch="resnet10", visual_arch="resnet10", width=8)
    out = model(tiny_audio(), tiny_visual())
    labels = torch.tensor([1, 2])
    probe_loss = F.cross_entropy(out.logits_audio, labels) + F.cross_entropy(out.logits_visual, labels)
    probe_loss.backward()
    for name, p in [*model.audio_encoder.named_parameters(), *model.visual_encoder.named_parameters()]:
        assert p.grad is None, name
    assert all(p.grad is None for p in model.fusion.parameters())
    assert model.probe_audio.weight.grad.abs().sum() > 0
    assert model.probe_visual.weight.grad.abs().sum() > 0


def test_av_classifier_rejects_unknown_fusion():
    with pytest.raises(ValueError, match="fusion must be one of"):
        build_av_classifier(K, fusion="attention", width=8)


# ---------------------------------------------------------------- uni-modal


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_unimodal_classifier(modality):
    model = build_unimodal_classifier(modality, K, arch="resnet18", width=8)
    assert model.has_probe_heads is False
    audio, visual = (tiny_audio(), None) if modality == "audio" else (None, tiny_visual())
    out = model(audio, visual)
    assert out.logits.shape == (2, K)
    if modality == "audio":
        assert model.visual_encoder is None and out.logits_visual is None
        assert out.logits_audio is out.logits
    else:
        assert model.audio_encoder is None and out.logits_audio is None
        assert out.logits_visual is out.logits
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    encoder = model.audio_encoder if modality == "audio" else model.visual_encoder
    assert encoder.conv1.weight.grad.abs().sum() > 0


def test_unimodal_ignores_other_modality_and_validates():
    model = build_unimodal_classifier("audio", K, arch="resnet10", width=8).eval()
    audio = tiny_audio()
    with torch.no_grad():
        torch.testing.assert_close(model(audio, tiny_visual()).logits, model(audio, None).logits)
    with pytest.raises(ValueError, match="audio must be a tensor"):
        model(None, tiny_visual())
    with pytest.raises(ValueError, match="modality must be one of"):
        build_unimodal_classifier("text", K)


def test_linear_init_follows_ogm_ge():
    # OGM-GE utils/utils.py weight_init: Xavier-normal Linear weight, zero bias.
    model = build_av_classifier(1000, fusion="concat", width=64, audio_arch="resnet10", visual_arch="resnet10")
    weight = model.fusion.fc_out.weight
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    expected_std = math.sqrt(2.0 / (fan_in + fan_out))
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.count_nonzero(model.fusion.fc_out.bias) == 0
    assert isinstance(model.fusion.fc_out, nn.Linear)
