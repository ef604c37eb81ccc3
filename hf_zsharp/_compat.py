"""The torch features hf_zsharp relies on, and one clear line for a torch that lacks them.

pyproject.toml declares `torch>=2.6` as a lower bound (torch's wheels are too large to test two of them here):
2.6 is the first release with FSDP2's public `torch.distributed.fsdp.fully_shard` and DTensor's public
`torch.distributed.tensor`, which the sharded statistics of the optimizers read.
"""

from __future__ import annotations

import torch

TORCH_FLOOR = "2.6"


def require_torch(feature: str, version: str = TORCH_FLOOR) -> None:
    """Raise ImportError naming `feature` when the installed torch is older than `version`."""
    if torch.__version__ < version:  # TorchVersion compares as a version, not as a string
        raise ImportError(
            f"hf_zsharp's {feature} needs torch>={version}, found torch {torch.__version__}: "
            f"pip install -U 'torch>={version}'"
        )
