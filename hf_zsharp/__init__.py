"""hf_zsharp: ZSharp (sharpness-aware minimization with Z-score gradient filtering) for Hugging Face.

Public names are imported lazily so that `import hf_zsharp` stays cheap (no transformers import for
users who only want the optimizer).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ASCENT_STATISTICS": "hf_zsharp.keys",
    "SAM": "hf_zsharp.optim",
    "ASAM": "hf_zsharp.optim",
    "FriendlySAM": "hf_zsharp.optim",
    "ZSharp": "hf_zsharp.optim",
    "create_sam_optimizer": "hf_zsharp.optim",
    "frozen_batchnorm_stats": "hf_zsharp.optim",
    "ZSharpArgumentsMixin": "hf_zsharp.args",
    "ZSharpTrainingArguments": "hf_zsharp.args",
    "ZSharpMixin": "hf_zsharp.trainer",
    "ZSharpTrainer": "hf_zsharp.trainer",
    "accelerate_step": "hf_zsharp.two_pass",
    "pop_sam_stats": "hf_zsharp.two_pass",
    "sharpness": "hf_zsharp.sharpness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_zsharp' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    return module if name == module.__name__.rsplit(".", 1)[-1] else getattr(module, name)
