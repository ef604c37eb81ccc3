"""Classification output shared by the paper's from-scratch models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import ImageClassifierOutput


def classification_output(
    logits: torch.Tensor, labels: torch.Tensor | None, return_dict: bool
) -> ImageClassifierOutput | tuple:
    """Wrap logits (and the cross-entropy loss when labels are given) the way transformers' classifiers do."""
    loss = F.cross_entropy(logits, labels.view(-1)) if labels is not None else None
    if not return_dict:
        return (logits,) if loss is None else (loss, logits)
    return ImageClassifierOutput(loss=loss, logits=logits)
