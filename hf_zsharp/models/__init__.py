"""The ZSharp paper's from-scratch architectures as transformers models, registered with the Auto classes.

Importing this package registers `cifar_resnet` and `cifar_vgg`, so that
`AutoModelForImageClassification.from_pretrained(path)` loads checkpoints saved with `save_pretrained`; those
checkpoints also carry the model code, so `from_pretrained(path, trust_remote_code=True)` (and
`pipeline(..., trust_remote_code=True)`) load them without the import.
"""

import inspect
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.dynamic_module_utils import get_relative_import_files

from .build import PAPER_MODELS, build_model
from .cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel
from .cifar_vgg import CifarVGGConfig, CifarVGGForImageClassification, CifarVGGModel
from .vit_paper import paper_vit_config

for _config, _base, _classifier in (
    (CifarResNetConfig, CifarResNetModel, CifarResNetForImageClassification),
    (CifarVGGConfig, CifarVGGModel, CifarVGGForImageClassification),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForImageClassification.register(_config, _classifier, exist_ok=True)
    # save_pretrained also writes the model's code and the config's `auto_map`, so the saved folder loads where
    # hf_zsharp is not imported (or not installed) with `trust_remote_code=True`, as custom models on the Hub do.
    _config.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _classifier.register_for_auto_class("AutoModelForImageClassification")

# The model code files `save_pretrained` writes next to the weights of these models (their modules and relative
# imports).
CODE_FILES = tuple(
    sorted(
        {
            Path(path).name
            for module in (CifarResNetForImageClassification, CifarVGGForImageClassification)
            for path in (inspect.getfile(module), *get_relative_import_files(inspect.getfile(module)))
        }
    )
)

__all__ = [
    "CODE_FILES",
    "PAPER_MODELS",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "CifarVGGConfig",
    "CifarVGGForImageClassification",
    "CifarVGGModel",
    "build_model",
    "paper_vit_config",
]
