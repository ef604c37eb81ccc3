"""Console entry points: `hf-zsharp-train` (also `scripts/train.py`) and `hf-zsharp-reproduce`.

The module imports no torch or transformers until a run needs them: an unknown flag is reported in a fraction of
a second (`refuse_unknown_flags`), not after the 10-20 s that importing transformers takes on a loaded machine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hf_zsharp.flags import refuse_unknown_flags
from hf_zsharp.keys import MANIFEST_NAME

if TYPE_CHECKING:
    from hf_zsharp.args import ModelKind
    from hf_zsharp.run import TrainingRun

logger = logging.getLogger(__name__)

INTERRUPTED = 130  # the exit status of a process ended by Ctrl-C (128 + SIGINT)
SUMMARY_METRICS = (
    "eval_accuracy",
    "eval_top5_accuracy",
    "eval_loss",
    "train_loss",
    "train_loss_since_resume",
    "epoch",
)


def train_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-train`: fine-tune or train an image classifier with ZSharp (or a baseline).

    With no arguments it runs the embedded default (ResNet-20 from scratch on digits); flags change that recipe.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv:
        logger.info("No arguments: training the default recipe (hf-zsharp-train --help lists it).")
    output_dir = None
    try:
        refuse_unknown_flags(argv)
        from hf_zsharp.args import parse_train_args, resolve_run
        from hf_zsharp.run import run_training

        run = resolve_run(*parse_train_args(argv))
        output_dir = run.training.output_dir
        warn_single_process_launch(os.environ)
        choose_threads(run.kind, run.training.use_cpu)
        run = run_training(run)
        if run.trainer.is_world_process_zero():
            print(run_summary(run))
        run.trainer.accelerator.end_training()  # under torchrun: leave the process group before exiting
    except KeyboardInterrupt:
        print(interrupted_message(output_dir), file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as error:  # every failure is one line and a non-zero exit; HF_ZSHARP_DEBUG=1 shows where
        if os.environ.get("HF_ZSHARP_DEBUG") == "1":
            raise
        unexpected = not isinstance(error, (ValueError, OSError))
        sys.exit(f"error: {error}" + (" (set HF_ZSHARP_DEBUG=1 for the traceback)" if unexpected else ""))


def reproduce_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-reproduce`: the paper's method comparison (see `hf_zsharp.reproduce`)."""
    from hf_zsharp import reproduce

    reproduce.main(sys.argv[1:] if argv is None else argv)


def warn_single_process_launch(environ: Mapping[str, str]) -> None:
    """Say, before training, when a launcher asked for several processes but started this one alone.

    `accelerate launch --num_processes N` without --multi_gpu on a machine with fewer than 2 GPUs uses its
    simple launcher: one process, given ACCELERATE_USE_CPU and, for the N > 1 it was asked for, MASTER_ADDR and
    MASTER_PORT, but no WORLD_SIZE (nor any ACCELERATE_NUM_PROCESSES). The run would train on one process and
    say so only in its closing line.
    """
    asked_several = "ACCELERATE_USE_CPU" in environ and "MASTER_PORT" in environ
    if asked_several and "WORLD_SIZE" not in environ:
        logger.warning(
            "accelerate launch was asked for more than one process but started this one alone (its single-process "
            "launcher, used without --multi_gpu on a machine with fewer than 2 GPUs): this run trains on 1 process. "
            "For N processes on the CPU, launch with `torchrun --nproc_per_node N $(which hf-zsharp-train) ...` "
            "or `accelerate launch --multi_gpu --num_processes N ...` (it starts them through torchrun, and they "
            "train as one CPU process group)."
        )


def interrupted_message(output_dir: str | None) -> str:
    """One line for Ctrl-C: where the run can be resumed from (its output directory's newest complete
    checkpoint), instead of a traceback."""
    if output_dir is None:
        return "Interrupted."
    from hf_zsharp.args import newest_complete_checkpoint

    checkpoint, _ = newest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return f"Interrupted: no complete checkpoint in {output_dir} to resume from."
    return f"Interrupted: the last checkpoint is {checkpoint}; resume it with --resume_from_checkpoint last."


def choose_threads(kind: ModelKind, use_cpu: bool) -> None:
    """One intra-op thread for the paper's small models on the CPU, unless OMP_NUM_THREADS says otherwise.

    Their layers are too small to gain from more threads, and on a machine under other load extra threads wait
    for cores (the embedded default took 3 minutes instead of 16 s on a loaded 2-core machine). The thread count
    changes the rounding, so a run's exact accuracy depends on it: OMP_NUM_THREADS=N reproduces a run made on N.
    """
    import torch

    from hf_zsharp.args import ModelKind

    if use_cpu and kind is ModelKind.FROM_SCRATCH and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        logger.info("One intra-op thread for a small model on the CPU (set OMP_NUM_THREADS to choose).")


def run_summary(run: TrainingRun) -> str:
    """Where a finished run's results are: the output folder and the files it wrote for the model, the final
    metrics, the processes and the total batch size."""
    args = run.trainer.args
    manifest = Path(args.output_dir) / MANIFEST_NAME
    files = json.loads(manifest.read_text(encoding="utf-8"))["files"] if manifest.is_file() else []
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in run.metrics.items() if key in SUMMARY_METRICS)
    total = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return "\n".join(
        [
            f"Finished. Results in {args.output_dir}: {', '.join(files)} ({MANIFEST_NAME} lists them).",
            f"Final metrics: {metrics}.",
            f"Trained on {args.world_size} process(es), total batch size {total} ({args.per_device_train_batch_size} "
            f"per device x {args.world_size} x {args.gradient_accumulation_steps} accumulation step(s)).",
        ]
    )
