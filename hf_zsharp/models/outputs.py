"""What the paper's from-scratch CNNs share: their image-model base class and their outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutput


class PaperCNNPreTrainedModel(PreTrainedModel):
    """An image model (pixel_values in) without input embeddings; subclasses set the config and initialisation."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def get_input_embeddings(self) -> None:
        """None: Accelerate's FSDP2 preparation asks every model for its input embeddings."""
        return None

    def pooled_output(
        self, hidden: torch.Tensor, return_dict: bool | None
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """A backbone's output: its last feature map `hidden` and the features pooled by its `pool`."""
        pooled = self.pool(hidden).flatten(1)
        if not (return_dict if return_dict is not None else self.config.return_dict):
            return hidden, pooled
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=hidden, pooler_output=pooled)


class PaperCNNForImageClassification(PaperCNNPreTrainedModel):
    """The forward of the classifiers: the backbone (named by `base_model_prefix`), its pooled features, the
    linear `classifier`, and the cross-entropy loss when `labels` are given."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        pooled = getattr(self, self.base_model_prefix)(pixel_values, return_dict=True).pooler_output
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return classification_output(self.classifier(pooled), labels, return_dict)


def classification_output(
    logits: torch.Tensor, labels: torch.Tensor | None, return_dict: bool
) -> ImageClassifierOutput | tuple:
    """Wrap logits (and the cross-entropy loss when labels are given) the way transformers' classifiers do."""
    loss = F.cross_entropy(logits, labels.view(-1)) if labels is not None else None
    if not return_dict:
        return (logits,) if loss is None else (loss, logits)
    return ImageClassifierOutput(loss=loss, logits=logits)
