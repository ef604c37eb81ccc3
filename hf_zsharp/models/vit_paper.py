"""The ZSharp paper's small ViT for 32x32 inputs, as a `ViTConfig` preset for `ViTForImageClassification`."""

from __future__ import annotations

from transformers import ViTConfig


def paper_vit_config(image_size: int = 32, **kwargs) -> ViTConfig:
    """ViT with 4x4 patches (8x8 of them at 32x32), 7 layers, hidden 384, MLP 384, 12 heads, CLS token, no dropout."""
    return ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        num_hidden_layers=7,
        hidden_size=384,
        intermediate_size=384,
        num_attention_heads=12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )
