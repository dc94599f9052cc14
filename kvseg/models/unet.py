"""The U-Net (Ronneberger et al., 2015) with BatchNorm, returning one logit channel.

Built from four named blocks: :class:`DoubleConv`, :class:`Down`, :class:`Up` and a 1x1 head.
``forward`` has no data-dependent Python branches, so it exports to ONNX and compiles with
``torch.compile``; the input-size check runs only in eager mode.
"""

from __future__ import annotations

import torch
from torch import nn

from kvseg.config import ModelConfig


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then :class:`DoubleConv`: halves the sides."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Double the sides, concatenate the encoder's skip tensor, then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "transpose") -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ValueError(f"upsample mode {mode!r}; expected 'transpose' or 'bilinear'")
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C_out, 2H, 2W)
        return self.conv(torch.cat([skip, x], dim=1))  # (B, 2 C_out, 2H, 2W) -> (B, C_out, 2H, 2W)


class UNet(nn.Module):
    """U-Net with ``depth`` down/up steps; widths ``base * 2**level``; returns logits (B, 1, H, W).

    Input sides must be multiples of ``2**depth``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 4, upsample: str = "transpose") -> None:
        super().__init__()
        self.depth = depth
        self.input_multiple = 2**depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], upsample) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input the U-Net cannot take."""
        multiple = 2**self.depth
        if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"U-Net of depth {self.depth} needs input (B, C, H, W) with H and W multiples of {multiple}; "
                f"got {tuple(x.shape)}"
            )

    def stages(self) -> dict[str, nn.Module]:
        """The named layers whose outputs the report shows: every encoder level, the bottleneck, every decoder level."""
        layers: dict[str, nn.Module] = {"encoder 0 (stem)": self.stem}
        for level, down in enumerate(self.downs[:-1], start=1):
            layers[f"encoder {level}"] = down
        layers["bottleneck"] = self.downs[-1]
        for level, up in zip(range(self.depth - 1, -1, -1), self.ups):
            layers[f"decoder {level}"] = up
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self.check_input(x)
        skips = [self.stem(x)]  # (B, base, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # level i: (B, base * 2**i, H / 2**i, W / 2**i)
        x = skips.pop()  # bottleneck
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)  # (B, 1, H, W)


def build_model(cfg: ModelConfig) -> UNet:
    """The U-Net described by ``cfg`` (its ``base_channels``, ``depth`` and ``upsample``); every ``model.arch`` is
    built by :func:`kvseg.models.build.build_model`."""
    return UNet(base_channels=cfg.base_channels, depth=cfg.depth, upsample=cfg.upsample)
