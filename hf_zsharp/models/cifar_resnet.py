"""CIFAR ResNet-20/56/110 (He et al. 2016, section 4.2) as a transformers model.

Three stages of BasicBlocks with 16-32-64 channels and option-A shortcuts (stride-2 subsampling plus
zero-padded channels, no parameters), as in the ZSharp paper's from-scratch experiments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from .outputs import PaperCNNForImageClassification, PaperCNNPreTrainedModel


class CifarResNetConfig(PretrainedConfig):
    """Configuration of a CIFAR ResNet: `depth = 6 n + 2` gives `n` BasicBlocks per stage."""

    model_type = "cifar_resnet"

    def __init__(
        self,
        depth: int = 20,
        widths: list[int] | tuple[int, ...] = (16, 32, 64),
        num_channels: int = 3,
        image_size: int = 32,
        **kwargs,
    ):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth}.")
        self.depth = depth
        self.widths = list(widths)
        self.num_channels = num_channels
        self.image_size = image_size
        super().__init__(**kwargs)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad the channels, adding no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetPreTrainedModel(PaperCNNPreTrainedModel):
    """Weight initialisation of the original CIFAR ResNet code (Kaiming-normal conv and linear weights)."""

    config_class = CifarResNetConfig
    base_model_prefix = "resnet"
    _no_split_modules = ["BasicBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class CifarResNetModel(CifarResNetPreTrainedModel):
    """Stem, three stages and global average pooling; returns the pooled features."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        blocks_per_stage = (config.depth - 2) // 6
        self.conv = nn.Conv2d(config.num_channels, config.widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(config.widths[0])
        layers = []
        in_channels = config.widths[0]
        for stage, width in enumerate(config.widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        return self.pooled_output(self.layers(F.relu(self.bn(self.conv(pixel_values)))), return_dict)


class CifarResNetForImageClassification(PaperCNNForImageClassification, CifarResNetPreTrainedModel):
    """CIFAR ResNet with a linear classifier; cross-entropy loss when `labels` are given."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        self.resnet = CifarResNetModel(config)
        self.classifier = nn.Linear(config.widths[-1], config.num_labels)
        self.post_init()
