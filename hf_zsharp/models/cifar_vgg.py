"""VGG with BatchNorm for small images (CIFAR, Tiny-ImageNet) as a transformers model.

The conv stack of Simonyan & Zisserman's configurations, each conv followed by BatchNorm and ReLU, then
global average pooling and one Linear(512, C), as in the ZSharp paper's from-scratch experiments.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from .outputs import PaperCNNForImageClassification, PaperCNNPreTrainedModel

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool (VGG configurations A, B, D and E).
VGG_LAYOUTS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class CifarVGGConfig(PretrainedConfig):
    """Configuration of a VGG-BN network; `depth` picks one of `VGG_LAYOUTS`."""

    model_type = "cifar_vgg"

    def __init__(self, depth: int = 16, num_channels: int = 3, image_size: int = 32, **kwargs):
        if depth not in VGG_LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}, got {depth}.")
        if image_size < 32:
            raise ValueError(
                f"VGG needs inputs of at least 32x32 (five 2x2 max-pools), got image_size={image_size}; choose 32 or "
                "more (`--image_size 32` on the command line)."
            )
        self.depth = depth
        self.num_channels = num_channels
        self.image_size = image_size
        super().__init__(**kwargs)


class CifarVGGPreTrainedModel(PaperCNNPreTrainedModel):
    """Weight initialisation of torchvision's VGG (Kaiming-normal convs, N(0, 0.01) classifier)."""

    config_class = CifarVGGConfig
    base_model_prefix = "vgg"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class CifarVGGModel(CifarVGGPreTrainedModel):
    """The conv-BN-ReLU stack and global average pooling; returns the pooled 512-d features."""

    def __init__(self, config: CifarVGGConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        in_channels = config.num_channels
        for item in VGG_LAYOUTS[config.depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(in_channels, item, 3, padding=1),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        return self.pooled_output(self.features(pixel_values), return_dict)


class CifarVGGForImageClassification(PaperCNNForImageClassification, CifarVGGPreTrainedModel):
    """VGG-BN with one linear classifier; cross-entropy loss when `labels` are given."""

    def __init__(self, config: CifarVGGConfig):
        super().__init__(config)
        self.vgg = CifarVGGModel(config)
        self.classifier = nn.Linear(512, config.num_labels)
        self.post_init()
