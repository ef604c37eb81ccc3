"""Build the paper's from-scratch architectures by name."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig, PreTrainedModel, ViTForImageClassification

from .cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification
from .cifar_vgg import CifarVGGConfig, CifarVGGForImageClassification
from .vit_paper import paper_vit_config

_BUILDERS: dict[str, tuple[Callable[..., PretrainedConfig], type[PreTrainedModel], dict]] = {
    "resnet20": (CifarResNetConfig, CifarResNetForImageClassification, {"depth": 20}),
    "resnet56": (CifarResNetConfig, CifarResNetForImageClassification, {"depth": 56}),
    "resnet110": (CifarResNetConfig, CifarResNetForImageClassification, {"depth": 110}),
    "vgg16": (CifarVGGConfig, CifarVGGForImageClassification, {"depth": 16}),
    "vgg19": (CifarVGGConfig, CifarVGGForImageClassification, {"depth": 19}),
    "vit-paper": (paper_vit_config, ViTForImageClassification, {}),
}

PAPER_MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    name: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    label2id: dict[str, int] | None = None,
    image_size: int = 32,
) -> PreTrainedModel:
    """A randomly initialised paper model (one of `PAPER_MODELS`) with a `num_labels`-way classifier."""
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(
            f"Unknown model {name!r}; the paper's from-scratch models are: {', '.join(PAPER_MODELS)}."
        )
    if id2label is not None and len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries but num_labels is {num_labels}.")
    id2label = id2label if id2label is not None else {i: str(i) for i in range(num_labels)}
    label2id = label2id if label2id is not None else {label: i for i, label in id2label.items()}
    make_config, model_class, preset = _BUILDERS[key]
    config = make_config(image_size=image_size, id2label=id2label, label2id=label2id, **preset)
    return model_class(config)
