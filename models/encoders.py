"""Audio and visual encoders (ResNet family) for audio-visual classification.

The 2D ResNets follow OGM-GE's backbone (OGM-GE_CVPR2022/models/backbone.py): a torchvision
ResNet with ``BasicBlock``, a 7x7/2 stem conv taking 1 input channel for spectrograms or 3 for
RGB frames, no global pooling or fc inside the trunk. The visual 2D variant runs the trunk per
frame and average-pools over (T, H, W), as OGM-GE_CVPR2022/models/basic_model.py
``AVClassifier.forward`` does. The 3D variants are torchvision.models.video's R(2+1)D-18 / R3D-18
with a configurable width.

The blocks below are torchvision's (torchvision/models/resnet.py ``BasicBlock``, ``_make_layer``;
torchvision/models/video/resnet.py ``Conv2Plus1D``, ``Conv3DSimple``, ``BasicBlock``, ``_make_layer``),
written out here with the same submodules, created and registered in the same order, so a seed gives
the same initial weights (tests/test_models_core.py builds both and compares). Importing torchvision
would load torch._dynamo through torchvision.ops: 1.5 s in every Train worker and Tune trial.

``width`` is the channel count of the first stage; stages have ``width * (1, 2, 4, 8)``
channels, so ``width=64`` reproduces the standard networks and ``out_dim == 8 * width``.
No pretrained weights are ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUDIO_ARCHS",
    "VISUAL_ARCHS",
    "AudioResNet",
    "FrameResNet",
    "VideoResNetEncoder",
    "build_audio_encoder",
    "build_visual_encoder",
]

# Blocks per stage. "resnet10" is a [1, 1, 1, 1] ResNet for fast CPU runs and tests.
_RESNET2D_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet10": (1, 1, 1, 1),
}
_VIDEO_ARCHS = ("r2plus1d", "r3d")
AUDIO_ARCHS: tuple[str, ...] = tuple(_RESNET2D_BLOCKS)
VISUAL_ARCHS: tuple[str, ...] = (*_RESNET2D_BLOCKS, *_VIDEO_ARCHS)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (channels of the first stage), got {width!r}")


def _check_input(x: Tensor, name: str, layout: str, channels: int) -> None:
    ndim = len(layout.split(","))
    if x.dim() != ndim or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape ({layout}) with C={channels}, got {tuple(x.shape)}")


def _init_conv_bn(module: nn.Module) -> None:
    # Net effect of OGM-GE's init (backbone.py, then utils/utils.py weight_init applied by main.py):
    # Kaiming-normal fan_out convs, BatchNorm weight 1 / bias 0. torchvision's VideoResNet does the same.
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (groups 1, no dilation): (N, inplanes, H, W) -> (N, planes, H/s, W/s)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _make_layer_2d(inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    # torchvision ResNet._make_layer: the 1x1 downsample is created before the first block.
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class _ResNet2dTrunk(nn.Module):
    """torchvision ResNet (BasicBlock) with configurable width and input channels, without pool/fc
    (``ResNet.__init__`` hard-codes 64 stem channels and builds an fc)."""

    def __init__(self, blocks: Sequence[int], in_channels: int, width: int) -> None:
        super().__init__()
        _check_width(width)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer_2d(width, width, blocks[0])
        self.layer2 = _make_layer_2d(width, 2 * width, blocks[1], stride=2)
        self.layer3 = _make_layer_2d(2 * width, 4 * width, blocks[2], stride=2)
        self.layer4 = _make_layer_2d(4 * width, 8 * width, blocks[3], stride=2)
        self.out_dim = 8 * width
        _init_conv_bn(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, 8 * width, H / 32, W / 32) feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AudioResNet(_ResNet2dTrunk):
    """2D ResNet over a spectrogram: (B, 1, T, F) -> (B, out_dim), global average pooled."""

    def __init__(self, blocks: Sequence[int], width: int = 64) -> None:
        super().__init__(blocks, in_channels=1, width=width)

    def forward(self, audio: Tensor) -> Tensor:
        _check_input(audio, "audio", "B, 1, T, F", channels=1)
        return F.adaptive_avg_pool2d(self.forward_features(audio), 1).flatten(1)


class FrameResNet(_ResNet2dTrunk):
    """2D ResNet applied per frame: (B, 3, T, H, W) -> (B, out_dim).

    Frames are folded into the batch (B*T), encoded independently, then average-pooled over
    (T, H, W) together, as OGM-GE_CVPR2022/models/basic_model.py ``AVClassifier.forward`` does.
    """

    def __init__(self, blocks: Sequence[int], width: int = 64) -> None:
        super().__init__(blocks, in_channels=3, width=width)

    def forward(self, visual: Tensor) -> Tensor:
        _check_input(visual, "visual", "B, 3, T, H, W", channels=3)
        b, c, t, h, w = visual.shape
        frames = visual.transpose(1, 2).reshape(b * t, c, h, w)
        fmap = self.forward_features(frames)  # (B*T, D, h', w')
        fmap = fmap.view(b, t, *fmap.shape[1:]).transpose(1, 2)  # (B, D, T, h', w')
        return F.adaptive_avg_pool3d(fmap, 1).flatten(1)


def _r2plus1d_stem(width: int) -> nn.Sequential:
    # torchvision R2Plus1dStem uses 45 mid channels for 64 outputs; keep that ratio for other widths.
    mid = max(1, (45 * width) // 64)
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


def _r3d_stem(width: int) -> nn.Sequential:
    # Same as torchvision BasicStem with ``width`` output channels.
    return nn.Sequential(
        nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class Conv3DSimple(nn.Conv3d):
    """torchvision R3D's 3x3x3 convolution (``midplanes`` unused, as there)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1) -> None:
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=1, bias=False)


class Conv2Plus1D(nn.Sequential):
    """torchvision R(2+1)D's factorised convolution: 1x3x3 spatial, BN, ReLU, then 3x1x1 temporal."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                      bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0),
                      bias=False),
        )


class VideoBasicBlock(nn.Module):
    """torchvision.models.video.resnet.BasicBlock: (B, inplanes, T, H, W) -> (B, planes, T/s, H/s, W/s)."""

    def __init__(self, inplanes: int, planes: int, conv_builder: type[nn.Module], stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        # The mid channels that give (2+1)D the parameter count of a full 3D conv (torchvision's formula).
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        super().__init__()
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def _make_layer_3d(conv_builder: type[nn.Module], inplanes: int, planes: int, blocks: int,
                   stride: int = 1) -> nn.Sequential:
    # torchvision VideoResNet._make_layer (both conv builders downsample by `stride` on T, H and W).
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv3d(inplanes, planes, kernel_size=1, stride=(stride,) * 3, bias=False),
                                   nn.BatchNorm3d(planes))
    layers = [VideoBasicBlock(inplanes, planes, conv_builder, stride, downsample)]
    layers += [VideoBasicBlock(planes, planes, conv_builder) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class VideoResNetEncoder(nn.Module):
    """R(2+1)D-18 or R3D-18 trunk with configurable width: (B, 3, T, H, W) -> (B, out_dim).

    torchvision.models.video's VideoResNet without its fc (its ``__init__`` hard-codes 64 channels).
    Always randomly initialised.
    """

    def __init__(self, arch: str = "r2plus1d", width: int = 64) -> None:
        super().__init__()
        _check_width(width)
        if arch == "r2plus1d":
            conv_builder: type[nn.Module] = Conv2Plus1D
            self.stem = _r2plus1d_stem(width)
        elif arch == "r3d":
            conv_builder = Conv3DSimple
            self.stem = _r3d_stem(width)
        else:
            raise ValueError(f"arch must be one of {_VIDEO_ARCHS}, got {arch!r}")
        self.layer1 = _make_layer_3d(conv_builder, width, width, 2)
        self.layer2 = _make_layer_3d(conv_builder, width, 2 * width, 2, stride=2)
        self.layer3 = _make_layer_3d(conv_builder, 2 * width, 4 * width, 2, stride=2)
        self.layer4 = _make_layer_3d(conv_builder, 4 * width, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.out_dim = 8 * width
        _init_conv_bn(self)

    def forward(self, visual: Tensor) -> Tensor:
        _check_input(visual, "visual", "B, 3, T, H, W", channels=3)
        x = self.stem(visual)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def build_audio_encoder(arch: str = "resnet18", width: int = 64) -> nn.Module:
    """Spectrogram encoder: (B, 1, T, F) -> (B, out_dim) with ``out_dim = 8 * width``.

    Args:
        arch: one of ``AUDIO_ARCHS`` ("resnet18", "resnet10").
        width: channels of the first ResNet stage.
    """
    if arch not in _RESNET2D_BLOCKS:
        raise ValueError(f"audio arch must be one of {AUDIO_ARCHS}, got {arch!r}")
    return AudioResNet(_RESNET2D_BLOCKS[arch], width=width)


def build_visual_encoder(arch: str = "resnet18", width: int = 64) -> nn.Module:
    """Frame-clip encoder: (B, 3, T, H, W) -> (B, out_dim) with ``out_dim = 8 * width``.

    Args:
        arch: one of ``VISUAL_ARCHS``: "resnet18"/"resnet10" (2D per frame, then pooled over
            T, H, W) or "r2plus1d"/"r3d" (torchvision R(2+1)D-18 / R3D-18 structure).
        width: channels of the first stage.
    """
    if arch in _RESNET2D_BLOCKS:
        return FrameResNet(_RESNET2D_BLOCKS[arch], width=width)
    if arch in _VIDEO_ARCHS:
        return VideoResNetEncoder(arch, width=width)
    raise ValueError(f"visual arch must be one of {VISUAL_ARCHS}, got {arch!r}")
