"""The training code shared by `hf-zsharp-train` and `hf-zsharp-reproduce`: data + model + ZSharpTrainer.

`run_training` fine-tunes a Hub / local / timm model, or trains one of the paper's from-scratch models, on an
image-classification dataset, then saves the model, its metrics and a model card, and pushes to the Hub when
asked. Every argument problem it can detect is raised before training starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.optim import Optimizer
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TrainerCallback,
    set_seed,
)

from hf_zsharp import cards, hub
from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.data import (
    collate_fn,
    load_image_dataset,
    normalization_stats,
    paper_transforms,
    processor_transforms,
    with_image_transforms,
)
from hf_zsharp.metrics import compute_metrics
from hf_zsharp.models import PAPER_MODELS, build_model
from hf_zsharp.trainer import ZSharpTrainer

logger = logging.getLogger(__name__)

# What a previous run leaves in its output directory; finding one means "another run lives here".
RUN_MARKERS = ("config.json", "trainer_state.json", "all_results.json", "README.md", "model.safetensors")


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str = field(
        default="resnet20",
        metadata={
            "help": "A Hub model id or local folder (any AutoModelForImageClassification model: ViT, ResNet, ...; "
            f"timm Hub models such as timm/resnet50.a1_in1k), or a paper model trained from scratch: {', '.join(PAPER_MODELS)}."
        },
    )
    image_size: int = field(
        default=32, metadata={"help": "Input resolution of the paper's from-scratch models."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset_name: str = field(
        default="digits",
        metadata={
            "help": "A Hub dataset id (uoft-cs/cifar10, uoft-cs/cifar100, zh-plus/tiny-imagenet, ...), a local "
            "imagefolder / parquet / save_to_disk folder, or 'digits' (scikit-learn's digits, offline)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (default: detected)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column (default: detected)."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Evaluation split (default: test, validation, valid or val)."}
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction of the training split for evaluation (no evaluation split)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})


@dataclass
class TrainingRun:
    """What `run_training` leaves behind: final metrics, the Trainer (model, data) and its log history."""

    metrics: dict[str, float]
    trainer: ZSharpTrainer
    log_history: list[dict[str, Any]]


def check_output_dir(training_args: ZSharpTrainingArguments) -> None:
    """Refuse an output directory that holds another run unless asked to overwrite or to resume it."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or training_args.resume_from_checkpoint or training_args.overwrite_output_dir:
        return
    found = sorted(name for name in RUN_MARKERS if (output_dir / name).exists())
    found += sorted(p.name for p in output_dir.glob("checkpoint-*"))
    if found:
        raise ValueError(
            f"Output directory {str(output_dir)!r} already holds a run ({', '.join(found[:5])}). Choose another "
            "--output_dir, resume with --resume_from_checkpoint, or pass --overwrite_output_dir to write over "
            "it (files are overwritten, never deleted)."
        )


def load_model(
    model_args: ModelArguments, labels: list[str]
) -> tuple[PreTrainedModel, Any | None, str | None]:
    """The model with a classifier for `labels`, its image processor, and its Hub/local base (None from scratch)."""
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    name = model_args.model_name_or_path
    if name.lower() in PAPER_MODELS:
        return build_model(name, len(labels), id2label, label2id, model_args.image_size), None, None
    try:
        config = AutoConfig.from_pretrained(
            name,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        raise ValueError(
            f"Cannot load model {name!r}: it is not one of the paper models ({', '.join(PAPER_MODELS)}), not a "
            f"local folder with a config.json, and the Hub did not provide it"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (no network, or no such repository)'}. "
            f"Pass a local path (a folder saved with save_pretrained) or unset HF_HUB_OFFLINE. ({error})"
        ) from error
    model = AutoModelForImageClassification.from_pretrained(
        name,
        config=config,
        ignore_mismatched_sizes=True,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
    )
    processor = AutoImageProcessor.from_pretrained(
        name, cache_dir=model_args.cache_dir, revision=model_args.model_revision
    )
    return model, processor, name


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ZSharpTrainingArguments,
    *,
    callbacks: list[TrainerCallback] | None = None,
    optimizer_cls_and_kwargs: tuple[type[Optimizer], dict[str, Any]] | None = None,
) -> TrainingRun:
    """Train and evaluate, then save model, metrics and model card to `output_dir` (and push if asked).

    `callbacks` and `optimizer_cls_and_kwargs` (the base optimizer) go to the Trainer, for the reproduction's
    paper recipe.
    """
    check_output_dir(training_args)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # our own push, after the card exists
    with training_args.main_process_first(desc="loading the dataset"):
        dataset, image_column, label_column, labels = load_image_dataset(
            data_args.dataset_name,
            dataset_config=data_args.dataset_config_name,
            image_column=data_args.image_column_name,
            label_column=data_args.label_column_name,
            train_split=data_args.train_split,
            eval_split=data_args.eval_split,
            train_val_split=data_args.train_val_split,
            cache_dir=model_args.cache_dir,
            seed=training_args.seed,
        )
    for split, limit in (("train", data_args.max_train_samples), ("eval", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    set_seed(training_args.seed)  # the model's initialisation depends on it
    model, processor, base_model = load_model(model_args, labels)
    if processor is None:
        mean, std = normalization_stats(data_args.dataset_name, dataset["train"], image_column)
        train_transform, eval_transform = paper_transforms(mean, std, model_args.image_size)
    else:
        train_transform, eval_transform = processor_transforms(processor)
    dataset = with_image_transforms(dataset, image_column, label_column, train_transform, eval_transform)

    trainer = ZSharpTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["eval"],
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
        processing_class=processor,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**train_result.metrics, **trainer.evaluate()}
    trainer.save_model()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        output_dir = training_args.output_dir
        repo_id = (training_args.hub_model_id or Path(output_dir).resolve().name) if push else None
        cards.write_model_card(
            output_dir,
            settings=training_args,
            metrics=metrics,
            log_history=trainer.state.log_history,
            base_model=base_model,
            dataset_name=data_args.dataset_name,
            dataset_split=data_args.eval_split,
            repo_id=repo_id,
        )
        if push:
            url = hub.push_to_hub(
                output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo
            )
            logger.info("Pushed %s to %s", output_dir, url)
    return TrainingRun(metrics=metrics, trainer=trainer, log_history=list(trainer.state.log_history))
