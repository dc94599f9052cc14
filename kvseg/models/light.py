"""kvseg's CPU-native segmenter: depthwise-separable and dilated convolutions, a small additive decoder.

Built for batch-1 inference on one or two CPU cores at 256x256, in three sizes (:data:`SIZES`):
``light-s``, ``light-m`` and ``light-l``: 39, 135 and 360 thousand parameters, 0.08, 0.27 and 0.48
GFLOPs per 256x256 image.
What it borrows, and from where:

* the encoder is a stack of **inverted residual blocks** (1x1 expansion, 3x3 depthwise, linear 1x1
  projection, a residual where the shape allows) — MobileNetV2, Sandler et al., CVPR 2018;
* its deepest stage ends in an **efficient spatial pyramid of dilated depthwise convolutions** with
  hierarchical feature fusion (each branch adds the one before it, so the dilations do not grid) —
  ESPNet, Mehta et al., ECCV 2018, and its depthwise form EESP, ESPNetv2, Mehta et al., CVPR 2019;
* the decoder **adds** each encoder level to the upsampled deeper one instead of concatenating, with one
  depthwise-separable refinement per level — LinkNet, Chaurasia and Culurciello, VCIP 2017; the head
  predicts at half resolution and the logits are upsampled bilinearly, as ENet (Paszke et al., 2016) does;
* the whole recipe — depthwise-separable and dilated convolutions, light cross-layer fusion, a few
  hundred thousand parameters or fewer — follows UltraSeg (Gao et al., 2026, arXiv 2602.04381), which
  reports a 0.13 M-parameter polyp segmenter at over 50 FPS on one CPU core at 256x256.

Every convolution is followed by BatchNorm (folded into it on export) and ReLU except the linear
projections, so the graph is Conv/Add/Resize only: ONNX, int8 QDQ and OpenVINO take it as they take
the U-Net. ``forward`` has no data-dependent branches; the input-size check runs in eager mode only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

INPUT_MULTIPLE = 16  # four stride-2 steps: input sides must divide by 16
MIN_IMAGE_SIZE = 32  # 2x2 at the deepest stage, where BatchNorm still trains on one image


@dataclass(frozen=True)
class LightSize:
    """The widths and depth of one size of :class:`LightSeg`."""

    widths: tuple[int, int, int, int]  # channels at strides 2, 4, 8 and 16
    blocks: tuple[int, int, int, int]  # inverted residual blocks per stage (the first of stages 2-4 has stride 2)
    expansion: int  # MobileNetV2's expansion factor t of the inverted residuals (the first block: 1)
    dilations: tuple[int, ...] = (1, 2, 4, 8)  # branches of the spatial pyramid at stride 16


SIZES: dict[str, LightSize] = {
    "light-s": LightSize(widths=(8, 16, 24, 48), blocks=(1, 2, 2, 2), expansion=3),
    "light-m": LightSize(widths=(16, 24, 32, 64), blocks=(1, 2, 3, 3), expansion=4),
    "light-l": LightSize(widths=(16, 32, 48, 96), blocks=(1, 2, 3, 4), expansion=4),
}


class ConvBNReLU(nn.Sequential):
    """k x k convolution (optionally strided, dilated or depthwise), BatchNorm, and ReLU unless ``relu`` is False."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 groups: int = 1, relu: bool = True) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (t > 1), 3x3 depthwise (stride, dilation), linear 1x1 project, + input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 4,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [ConvBNReLU(in_channels, hidden, 1)] if expansion > 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, dilation, groups=hidden),
                   ConvBNReLU(hidden, out_channels, 1, relu=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)  # (B, C_out, H / stride, W / stride)
        return x + out if self.residual else out


class DilatedPyramid(nn.Module):
    """ESP(v2)-style context module: reduce, parallel dilated depthwise 3x3 branches fused hierarchically, merge, + input.

    Branch k sees a receptive field of ``2 * dilations[k] + 1`` pixels at its stride; adding each branch
    to the previous ones (hierarchical feature fusion, ESPNet Sec. 3.1) removes the gridding that
    dilated convolutions alone leave.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        reduced = max(channels // len(dilations), 4)
        self.reduce = ConvBNReLU(channels, reduced, 1)
        self.branches = nn.ModuleList(ConvBNReLU(reduced, reduced, 3, dilation=d, groups=reduced) for d in dilations)
        self.merge = ConvBNReLU(reduced * len(dilations), channels, 1, relu=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)  # (B, C / K, H, W)
        fused, total = [], None
        for branch in self.branches:
            out = branch(reduced)
            total = out if total is None else total + out
            fused.append(total)
        return self.act(x + self.merge(torch.cat(fused, dim=1)))  # (B, C, H, W)


class AddUp(nn.Module):
    """LinkNet-style decoder step: 1x1 to the skip's width, bilinear x2, add the skip, depthwise-separable 3x3."""

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.project = ConvBNReLU(in_channels, skip_channels, 1)
        self.refine = nn.Sequential(ConvBNReLU(skip_channels, skip_channels, 3, groups=skip_channels),
                                    ConvBNReLU(skip_channels, skip_channels, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.project(x), scale_factor=2.0, mode="bilinear", align_corners=False)  # (B, C_skip, 2H, 2W)
        return self.refine(x + skip)


def _stage(in_channels: int, out_channels: int, blocks: int, expansion: int, stride: int) -> nn.Sequential:
    """``blocks`` inverted residuals, the first one strided (and unexpanded in the first stage, as MobileNetV2)."""
    first_expansion = 1 if stride == 1 else expansion
    layers = [InvertedResidual(in_channels, out_channels, stride, first_expansion)]
    layers += [InvertedResidual(out_channels, out_channels, 1, expansion) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class LightSeg(nn.Module):
    """The light model of one :class:`LightSize`: images (B, 3, H, W) float32 -> logits (B, 1, H, W).

    Input sides must be multiples of :data:`INPUT_MULTIPLE` (16).
    """

    input_multiple = INPUT_MULTIPLE

    def __init__(self, size: LightSize, in_channels: int = 3) -> None:
        super().__init__()
        w, n, t = size.widths, size.blocks, size.expansion
        self.stem = ConvBNReLU(in_channels, w[0], 3, stride=2)  # (B, w0, H/2, W/2)
        self.encoder = nn.ModuleList([
            _stage(w[0], w[0], n[0], t, stride=1),  # H/2
            _stage(w[0], w[1], n[1], t, stride=2),  # H/4
            _stage(w[1], w[2], n[2], t, stride=2),  # H/8
            _stage(w[2], w[3], n[3], t, stride=2),  # H/16
        ])
        self.context = DilatedPyramid(w[3], size.dilations)
        self.decoder = nn.ModuleList([AddUp(w[3], w[2]), AddUp(w[2], w[1]), AddUp(w[1], w[0])])
        self.head = nn.Conv2d(w[0], 1, kernel_size=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input the model cannot take."""
        if x.ndim != 4 or x.shape[-1] % INPUT_MULTIPLE or x.shape[-2] % INPUT_MULTIPLE:
            raise ValueError(f"light model needs input (B, C, H, W) with H and W multiples of {INPUT_MULTIPLE}; "
                             f"got {tuple(x.shape)}")

    def stages(self) -> dict[str, nn.Module]:
        """The named layers whose outputs the report shows as feature maps, in network order."""
        layers: dict[str, nn.Module] = {"stem": self.stem}
        layers.update({f"encoder {level} (1/{2 ** (level + 1)})": stage for level, stage in enumerate(self.encoder)})
        layers["context (dilated pyramid)"] = self.context
        layers.update({f"decoder (1/{2 ** (3 - i)})": up for i, up in enumerate(self.decoder)})
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self.check_input(x)
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)  # strides 2, 4, 8, 16
        x = self.context(skips.pop())  # (B, w3, H/16, W/16)
        for up in self.decoder:
            x = up(x, skips.pop())  # H/8, H/4, H/2
        logits = self.head(x)  # (B, 1, H/2, W/2)
        return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)  # (B, 1, H, W)
