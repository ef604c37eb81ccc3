"""The training code shared by `hf-zsharp-train` and `hf-zsharp-reproduce`: data + model + ZSharpTrainer.

`run_training` fine-tunes a Hub / local / timm model, or trains one of the paper's from-scratch models, on an
image-classification dataset, then saves the model, its metrics and a model card, and pushes to the Hub when
asked. Every argument problem it can detect is raised before training starts.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    SchedulerType,
    TimmWrapperConfig,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import integration_utils
from transformers.trainer_utils import HubStrategy

from hf_zsharp import hub
from hf_zsharp.args import (
    DataArguments,
    ModelArguments,
    ModelKind,
    ResolvedRun,
    ZSharpTrainingArguments,
    check_output_dir,
    checkpoint_state,
)
from hf_zsharp.augment import augment_inputs
from hf_zsharp.data import LABELS, load_image_dataset, normalization_stats
from hf_zsharp.image_data import (
    check_image_size,
    paper_image_data,
    paper_image_processor,
    processor_image_data,
)
from hf_zsharp.metrics import compute_metrics
from hf_zsharp.models import PAPER_MODELS, build_model
from hf_zsharp.trainer import ZSharpTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What `run_training` leaves behind: final metrics, the Trainer (model, data), its log history, the splits
    it trained and evaluated on, as loaded (before any preprocessing), and the handle of the batch augmentation
    the model runs on uint8 `pixel_values` (`augment_inputs`; None when the data is preprocessed per image):
    still attached, so the model takes cached uint8 batches as in training; `.remove()` detaches it."""

    metrics: dict[str, float]
    trainer: ZSharpTrainer
    log_history: list[dict[str, Any]]
    dataset: DatasetDict
    augmentation: RemovableHandle | None


def load_model(
    model_args: ModelArguments, labels: list[str], image_size: int | None = None
) -> tuple[PreTrainedModel, Any | None, str | None]:
    """The model with a classifier for `labels`, its image processor, and its Hub/local base (None from scratch,
    at `image_size`, or the arguments' own)."""
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    name = model_args.model_name_or_path
    if ModelKind.of(name) is ModelKind.FROM_SCRATCH:
        size = image_size or model_args.image_size
        return build_model(name, len(labels), id2label, label2id, size), None, None
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
    if isinstance(config, TimmWrapperConfig):
        # timm's wrapper saves `label_names`, not id2label, and keeps the source model's (ImageNet's 1000): a
        # reload would name this model's classes from those, and pipeline() would answer LABEL_0, LABEL_1, ...
        config.label_names = list(labels)
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


def check_reporting(report_to: list[str]) -> None:
    """Refuse, before the data loads, a --report_to integration whose package is missing (transformers' own
    availability check): Trainer would fail only once built, after the data, advising for tensorboard an update
    of PyTorch."""
    for name in report_to:
        available = getattr(integration_utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ValueError(
                f"--report_to {name}: the {name} package is not installed; install it (pip install {name}) or "
                f"leave {name} out of --report_to."
            )


def batches_per_epoch(num_examples: int, args: TrainingArguments) -> int:
    """The training batches each process reads in an epoch of `num_examples`: the data loader's length, in
    batches of `per_device_train_batch_size` per process (a last, smaller one dropped with
    --dataloader_drop_last)."""
    per_step = args.per_device_train_batch_size * args.world_size
    return num_examples // per_step if args.dataloader_drop_last else math.ceil(num_examples / per_step)


def optimizer_steps(num_examples: int, args: TrainingArguments) -> int:
    """The optimizer steps of the run as Trainer counts them: --max_steps, or the epochs of accumulated batches."""
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(math.ceil(batches_per_epoch(num_examples, args) / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def check_batches(num_examples: int, args: TrainingArguments) -> None:
    """Refuse, before training, --dataloader_drop_last with a batch larger than the training split: every batch
    would be dropped, and Trainer would train nothing and report success."""
    if args.dataloader_drop_last and batches_per_epoch(num_examples, args) == 0:
        raise ValueError(
            f"--dataloader_drop_last with a batch of {args.per_device_train_batch_size * args.world_size} "
            f"({args.per_device_train_batch_size} per device x {args.world_size} process(es)) and {num_examples} "
            "training examples: every batch would be dropped and nothing trained. Lower "
            f"--per_device_train_batch_size to {num_examples // args.world_size} or less, or leave out "
            "--dataloader_drop_last."
        )


def warn_short_warmup(num_examples: int, args: TrainingArguments) -> None:
    """Warn, before training, when the run ends within its learning-rate warm-up: it never trains at the
    learning rate it states (the card's "warm-up N steps" would not say so)."""
    steps = optimizer_steps(num_examples, args)
    warmup = args.get_warmup_steps(steps)
    no_warmup = (SchedulerType.CONSTANT, SchedulerType.REDUCE_ON_PLATEAU)
    if warmup >= steps and args.lr_scheduler_type not in no_warmup:
        logger.warning(
            "The run takes %d optimizer step(s) and warms up over %d (--warmup_steps %s): its learning rate rises "
            "to %.3g, %.0f%% of --learning_rate %g, and never reaches it. Lower --warmup_steps or train longer.",
            steps,
            warmup,
            f"{args.warmup_steps:g}",
            args.learning_rate * (steps - 1) / warmup,
            100 * (steps - 1) / warmup,
            args.learning_rate,
        )


def with_whole_run_loss(
    metrics: dict[str, float], log_history: list[dict[str, Any]], resumed_at: int, global_step: int
) -> dict[str, float]:
    """`metrics` of a run resumed at step `resumed_at`, with the training loss of the whole run.

    Trainer's `train_loss` is the mean since the resume. The whole run's weighs it with the losses logged up to
    the resume (each the mean over the steps since the previous log) when those reach the resume's step;
    otherwise the loss of the steps between the last log and the checkpoint was never recorded, and the metric
    keeps Trainer's value under the name of what it is: `train_loss_since_resume`.
    """
    logged = [
        (entry["step"], entry["loss"])
        for entry in log_history
        if "loss" in entry and entry.get("step", resumed_at + 1) <= resumed_at
    ]
    if not logged or logged[-1][0] != resumed_at:
        return {
            ("train_loss_since_resume" if key == "train_loss" else key): value
            for key, value in metrics.items()
        }
    total, previous = 0.0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        previous = step
    total += metrics["train_loss"] * (global_step - resumed_at)
    return {**metrics, "train_loss": total / global_step}


def run_name(
    model_args: ModelArguments, data_args: DataArguments, training_args: ZSharpTrainingArguments
) -> str:
    """A readable model name for the card: `<model>-<dataset>-<method>` (e.g. resnet20-digits-zsharp)."""
    parts = (model_args.model_name_or_path, data_args.dataset_name, training_args.sam)
    return "-".join(re.sub(r"[^A-Za-z0-9._-]+", "-", Path(part.rstrip("/")).name) for part in parts)


def run_training(
    run: ResolvedRun,
    *,
    callbacks: list[TrainerCallback] | None = None,
    optimizer_cls_and_kwargs: tuple[type[Optimizer], dict[str, Any]] | None = None,
    trainer_cls: type[ZSharpTrainer] = ZSharpTrainer,
) -> TrainingRun:
    """Train and evaluate, then save model, metrics and model card to `output_dir` (and push if asked).

    Everything that can be checked is checked before training (output folder, Hub prerequisites, data);
    only the files this run wrote are pushed. `callbacks` and `optimizer_cls_and_kwargs` (the base optimizer)
    go to the Trainer, of class `trainer_cls` (a `ZSharpTrainer`), for the reproduction's paper recipe.
    """
    model_args, data_args, training_args = run.model, run.data, run.trainer_args
    check_output_dir(run)
    check_reporting(training_args.report_to)
    if run.push_to is not None:
        hub.check_push_prerequisites(run.push_to, training_args.hub_token)
    if run.image_size is not None:
        check_image_size(run.image_size, training_args.per_device_train_batch_size)
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_image_dataset(
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
    check_batches(len(dataset["train"]), training_args)
    warn_short_warmup(len(dataset["train"]), training_args)
    set_seed(training_args.seed)  # the model's initialisation depends on it
    model, processor, base_model = load_model(
        model_args, dataset["train"].features[LABELS].names, run.image_size
    )
    if processor is None:
        mean, std = normalization_stats(data_args.dataset_name, dataset["train"])
        data = paper_image_data(dataset, mean, std, run.image_size)
        processor = paper_image_processor(run.image_size, mean, std)
    else:
        data = processor_image_data(dataset, processor)
    # Cached splits: each uint8 batch is cropped, flipped and normalised on the device, inside the model's forward.
    augmentation = augment_inputs(model, data.augment) if data.augment is not None else None

    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=compute_metrics,
        processing_class=processor,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    outputs = hub.RunOutputs(
        trainer,
        run,
        model_name=run.push_to.rsplit("/", 1)[-1]
        if run.push_to
        else run_name(model_args, data_args, training_args),
        base_model=base_model,
    )
    if run.push_to is not None and training_args.hub_strategy != HubStrategy.END:
        trainer.add_callback(hub.PushOnSave(outputs))
    if run.resume_from:
        logger.info("Resuming training from the checkpoint %s.", run.resume_from)
    try:
        train_result = trainer.train(resume_from_checkpoint=run.resume_from)
    finally:
        outputs.wait()  # the last background push reads the files the end of the run rewrites
    metrics = {**train_result.metrics, **trainer.evaluate()}
    if run.resume_from:
        resumed_at = checkpoint_state(run.resume_from)["global_step"]
        metrics = with_whole_run_loss(
            metrics, trainer.state.log_history, resumed_at, trainer.state.global_step
        )
    trainer.save_model()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        outputs.write_card(metrics)
        if run.push_to is not None:
            outputs.push_at_the_end()
    return TrainingRun(
        metrics=metrics,
        trainer=trainer,
        log_history=list(trainer.state.log_history),
        dataset=dataset,
        augmentation=augmentation,
    )
