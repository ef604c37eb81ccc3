"""Console entry points: `hf-zsharp-train` (also `scripts/train.py`) and `hf-zsharp-reproduce`."""

from __future__ import annotations

import logging
import sys

from transformers import HfArgumentParser

from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.run import DataArguments, ModelArguments, run_training

# `hf-zsharp-train` with no arguments: ResNet-20 from scratch on scikit-learn's digits (8x8, upsampled to
# 16x16) with ZSharp, on the CPU in about two minutes, offline.
DEFAULT_TRAIN_ARGS = [
    "--model_name_or_path", "resnet20",
    "--image_size", "16",
    "--dataset_name", "digits",
    "--output_dir", "outputs",
    "--sam", "zsharp",
    "--num_train_epochs", "4",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "256",
    "--learning_rate", "3e-3",
    "--weight_decay", "5e-5",
    "--lr_scheduler_type", "cosine",
    "--warmup_steps", "10",
    "--eval_strategy", "epoch",
    "--save_strategy", "no",
    "--logging_strategy", "epoch",
    "--report_to", "none",
    "--overwrite_output_dir",
    "--use_cpu",
]  # fmt: skip


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ZSharpTrainingArguments]:
    """Parse command-line flags, or a single YAML/JSON config file path as in the transformers examples."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ZSharpTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def train_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-train`: fine-tune or train an image classifier with ZSharp (or a baseline)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv:
        logging.info("No arguments: running the embedded default (%s)", " ".join(DEFAULT_TRAIN_ARGS))
        argv = DEFAULT_TRAIN_ARGS
    try:
        model_args, data_args, training_args = parse_train_args(argv)
        run_training(model_args, data_args, training_args)
    except ValueError as error:
        sys.exit(f"error: {error}")


def reproduce_main(argv: list[str] | None = None) -> None:
    """`hf-zsharp-reproduce`: the paper's method comparison (see `hf_zsharp.reproduce`)."""
    from hf_zsharp.reproduce import main

    main(sys.argv[1:] if argv is None else argv)
