"""Console entry points: `hf-zsharp-train` (also `scripts/train.py`) and `hf-zsharp-reproduce`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from hf_zsharp import hub, reproduce
from hf_zsharp.args import ModelKind, parse_train_args, resolve_run
from hf_zsharp.run import TrainingRun, run_training

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
        run = resolve_run(*parse_train_args(argv))
        choose_threads(run.kind, run.training.use_cpu)
        run = run_training(run)
        if run.trainer.is_world_process_zero():
            print(run_summary(run))
        run.trainer.accelerator.end_training()  # under torchrun: leave the process group before exiting
    except Exception as error:  # every failure is one line and a non-zero exit; HF_ZSHARP_DEBUG=1 shows where
        if os.environ.get("HF_ZSHARP_DEBUG") == "1":
            raise
        unexpected = not isinstance(error, (ValueError, OSError))
        sys.exit(f"error: {error}" + (" (set HF_ZSHARP_DEBUG=1 for the traceback)" if unexpected else ""))


def reproduce_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-reproduce`: the paper's method comparison (see `hf_zsharp.reproduce`)."""
    reproduce.main(sys.argv[1:] if argv is None else argv)


def choose_threads(kind: ModelKind, use_cpu: bool) -> None:
    """One intra-op thread for the paper's small models on the CPU, unless OMP_NUM_THREADS says otherwise.

    Their layers are too small to gain from more threads, and on a machine under other load extra threads wait
    for cores (the embedded default took 3 minutes instead of 16 s on a loaded 2-core machine). The thread count
    changes the rounding, so a run's exact accuracy depends on it: OMP_NUM_THREADS=N reproduces a run made on N.
    """
    if use_cpu and kind is ModelKind.FROM_SCRATCH and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        logger.info("One intra-op thread for a small model on the CPU (set OMP_NUM_THREADS to choose).")


def run_summary(run: TrainingRun) -> str:
    """Where a finished run's results are: the output folder and the files it wrote for the model, the final
    metrics, the processes and the total batch size."""
    args = run.trainer.args
    manifest = Path(args.output_dir) / hub.MANIFEST_NAME
    files = json.loads(manifest.read_text(encoding="utf-8"))["files"] if manifest.is_file() else []
    metrics = ", ".join(
        f"{key} {value:.4g}"
        for key, value in run.metrics.items()
        if key in ("eval_accuracy", "eval_top5_accuracy", "eval_loss", "train_loss", "epoch")
    )
    total = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return "\n".join(
        [
            f"Finished. Results in {args.output_dir}: {', '.join(files)} ({hub.MANIFEST_NAME} lists them).",
            f"Final metrics: {metrics}.",
            f"Trained on {args.world_size} process(es), total batch size {total} ({args.per_device_train_batch_size} "
            f"per device x {args.world_size} x {args.gradient_accumulation_steps} accumulation step(s)).",
        ]
    )
