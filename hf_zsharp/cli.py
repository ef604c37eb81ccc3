"""Console entry points: `hf-zsharp-train` (also `scripts/train.py`) and `hf-zsharp-reproduce`."""

from __future__ import annotations

import logging
import os
import sys

from hf_zsharp import reproduce
from hf_zsharp.args import parse_train_args
from hf_zsharp.run import run_training

logger = logging.getLogger(__name__)


def train_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-train`: fine-tune or train an image classifier with ZSharp (or a baseline).

    With no arguments it runs the embedded default (ResNet-20 from scratch on digits); flags change that recipe.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv:
        logger.info("No arguments: training the default recipe (hf-zsharp-train --help lists it).")
    try:
        model_args, data_args, training_args = parse_train_args(argv)
        run = run_training(model_args, data_args, training_args)
        run.trainer.accelerator.end_training()  # under torchrun: leave the process group before exiting
    except Exception as error:  # every failure is one line and a non-zero exit; HF_ZSHARP_DEBUG=1 shows where
        if os.environ.get("HF_ZSHARP_DEBUG") == "1":
            raise
        unexpected = not isinstance(error, (ValueError, OSError))
        sys.exit(f"error: {error}" + (" (set HF_ZSHARP_DEBUG=1 for the traceback)" if unexpected else ""))


def reproduce_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-reproduce`: the paper's method comparison (see `hf_zsharp.reproduce`)."""
    reproduce.main(sys.argv[1:] if argv is None else argv)
