"""One run of the grid: train through `run_training`, then test, measure and describe it in a record.

Model selection uses the validation split held out of the training data (the run's evaluation split): the
test split is evaluated once at the end of training (the pre-set point) and once at the epoch of best
validation accuracy, never to choose anything.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import Dataset as TorchDataset
from transformers import TrainerCallback

from hf_zsharp.args import parse_train_args, resolve_run
from hf_zsharp.data import dataset_pixel_rule, load_image_dataset
from hf_zsharp.image_data import paper_image_data, processor_image_data
from hf_zsharp.keys import LOGGED_STATISTICS
from hf_zsharp.reproduce.grid import Plan, RunSpec
from hf_zsharp.reproduce.mask_overlap import LOG_KEY as MASK_JACCARD
from hf_zsharp.reproduce.mask_overlap import MaskOverlap
from hf_zsharp.reproduce.presets import VARIANTS, SharpnessSettings
from hf_zsharp.reproduce.recipe import paper_trainer_hooks
from hf_zsharp.reproduce.records import RECORD_FORMAT, code_version, environment
from hf_zsharp.run import TrainingRun, load_model, run_training

# Per-epoch keys kept in a record's history (the Trainer's epoch logs, training and validation).
HISTORY_KEYS = (
    "epoch", "loss", "grad_norm", "learning_rate",
    *LOGGED_STATISTICS, MASK_JACCARD,
    "eval_loss", "eval_accuracy",
)  # fmt: skip


def filtered_tensor_count(model: torch.nn.Module) -> int:
    """L: the trainable tensors with ndim > 1, which ZSharp filters and moves by rho each."""
    return sum(1 for p in model.parameters() if p.requires_grad and p.ndim > 1)


class BestValidation(TrainerCallback):
    """Keeps a CPU copy of the weights at the first epoch of best validation accuracy."""

    def __init__(self) -> None:
        self.accuracy = -math.inf
        self.epoch: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: Mapping[str, float],
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        accuracy = metrics.get("eval_accuracy")
        if accuracy is not None and accuracy > self.accuracy:
            self.accuracy, self.epoch = accuracy, state.epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_test_split(data_args: Any, cache_dir: str | None) -> Dataset:
    """The dataset's test split: the first of test / validation / valid / val (the run evaluated on a hold-out)."""
    return load_image_dataset(
        data_args.dataset_name,
        dataset_config=data_args.dataset_config_name,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
        train_split=data_args.train_split,
        cache_dir=cache_dir,
    )["eval"]


def like_eval(training: TrainingRun, split: Dataset, image_size: int | None) -> TorchDataset:
    """`split` prepared as the run prepared its evaluation split: no augmentation, the same resize and
    normalisation. Cached (uint8) only if the run's model normalises uint8 batches itself (its
    `training.augmentation`, still attached)."""
    trainer = training.trainer
    pair = DatasetDict({"train": split.select([0]), "eval": split})
    rule = dataset_pixel_rule(
        training.dataset
    )  # images over 8 bits read as in training (fitted on its split)
    budget = None if training.augmentation is not None else 0
    processor = trainer.processing_class
    if image_size is not None:  # a paper model from scratch: its processor holds the run's statistics
        return paper_image_data(
            pair, processor.image_mean, processor.image_std, image_size, budget=budget, rule=rule
        ).eval
    return processor_image_data(pair, processor, budget=budget, rule=rule).eval


def fixed_batches(
    data: TorchDataset, collator: Any, settings: SharpnessSettings, seed: int = 0
) -> list[dict]:
    """`settings.batches` batches of distinct images drawn by `seed` (the same images for every run of a seed)."""
    count = min(settings.batches * settings.batch_size, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [
        collator([data[i] for i in order[start : start + settings.batch_size]])
        for start in range(0, count, settings.batch_size)
    ]


def measure(training: TrainingRun, train: TorchDataset, settings: SharpnessSettings) -> dict[str, Any]:
    """`hf_zsharp.sharpness.measure_sharpness` of the trained model on fixed training images (prepared for
    evaluation), with the settings and the seconds it took."""
    from hf_zsharp.sharpness import adversarial_sharpness, measure_sharpness

    start = time.perf_counter()
    batches = fixed_batches(train, training.trainer.data_collator, settings)
    model = training.trainer.model
    result = measure_sharpness(
        model,
        batches,
        rho=settings.rho,
        ascent_steps=settings.ascent_steps,
        lanczos_iters=settings.lanczos_iters,
        scale_invariant_rho=settings.scale_invariant_rho,
    )
    if settings.extra_radii:
        result["sharpness_at"] = {
            f"{rho:g}": adversarial_sharpness(model, batches, rho, settings.ascent_steps)
            for rho in settings.extra_radii
        }
    images = sum(len(b["labels"]) for b in batches)
    return {**result, "images": images, "settings": asdict(settings), "seconds": time.perf_counter() - start}


def epoch_history(log_history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """One entry per epoch, merging its training log (loss, ascent statistics) and its validation log."""
    epochs: dict[float, dict[str, float]] = {}
    for entry in log_history:
        if "epoch" not in entry or "train_runtime" in entry:  # the end-of-training summary is no epoch
            continue
        row = epochs.setdefault(round(float(entry["epoch"]), 4), {})
        row.update({k: float(v) for k, v in entry.items() if k in HISTORY_KEYS})
    return [epochs[e] for e in sorted(epochs)]


def _evaluate_test(trainer: Any, test: Dataset) -> tuple[dict[str, float], str]:
    """Test accuracy and loss, and which test images the model classifies right ("1") or wrong ("0"), in the
    split's order: what a bootstrap over test images resamples."""
    output = trainer.predict(test, metric_key_prefix="test")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    correct = "".join("1" if right else "0" for right in (logits.argmax(-1) == output.label_ids).tolist())
    metrics = output.metrics
    return {
        "test_accuracy": float(metrics["test_accuracy"]),
        "test_loss": float(metrics["test_loss"]),
    }, correct


def hyperparameters(model_args: Any, data_args: Any, training_args: Any) -> dict[str, Any]:
    """Every argument of the run (model, data, training), as JSON values."""
    return {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "training": json.loads(training_args.to_json_string()),
    }


def train_one(plan: Plan, spec: RunSpec) -> dict[str, Any] | None:
    """Train, test and (if asked) measure one run; its record (None on processes other than the main one)."""
    flags = plan.flags(spec)
    model_args, data_args, training_args = parse_train_args(flags)
    run = resolve_run(model_args, data_args, training_args)
    if VARIANTS[spec.method].matched:  # sam-matched: rho * sqrt(L), ZSharp's total norm on this model
        with torch.random.fork_rng(devices=[]):  # building it draws its initialisation: not the run's draws
            count = filtered_tensor_count(load_model(model_args, ["0", "1"], run.image_size)[0])
        run = resolve_run(
            model_args, data_args, training_args, sam_rho=training_args.sam_rho * math.sqrt(count)
        )
    hooks = paper_trainer_hooks(training_args) if plan.preset.paper_recipe else {}
    best = BestValidation()
    overlap = [MaskOverlap()] if VARIANTS[spec.method].filtered else []  # acts on Z-score masks only
    callbacks = [*hooks.pop("callbacks", []), best, *overlap]
    start = time.perf_counter()
    training = run_training(run, callbacks=callbacks, **hooks)
    wall_time = time.perf_counter() - start
    trainer = training.trainer
    train, test = training.dataset["train"], load_test_split(data_args, model_args.cache_dir)
    image_size = run.image_size
    test = like_eval(training, test, image_size)
    final, test_correct = _evaluate_test(trainer, test)
    sharpness = None
    if plan.measure_sharpness:
        sharpness = measure(training, like_eval(training, train, image_size), plan.preset.sharpness)
    at_best = final
    if best.state is not None and best.epoch != trainer.state.epoch:  # else the final weights are the best
        final_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.model.load_state_dict(best.state)
        at_best, _ = _evaluate_test(trainer, test)
        trainer.model.load_state_dict(final_state)
    if not trainer.is_world_process_zero():
        return None
    metrics = training.metrics
    record = {
        "format": RECORD_FORMAT,
        "command": plan.command(spec),
        "folder": spec.folder(".").as_posix(),
        "dataset": spec.dataset,
        "model": spec.model,
        "method": spec.method,
        "variant": spec.variant,
        "seed": spec.seed,
        "rho": spec.effective_rho,
        "percentile": spec.effective_percentile,
        "sam_rho": run.sam_settings.get(
            "sam_rho"
        ),  # the radius the optimizer used (sam-matched: rho * sqrt(L))
        "filtered_tensors": filtered_tensor_count(trainer.model),
        "metrics": {
            **final,
            "val_accuracy": float(metrics["eval_accuracy"]),
            "val_loss": float(metrics["eval_loss"]),
            "train_loss": float(metrics["train_loss"]),
            "best_val_epoch": best.epoch,
            "best_val_accuracy": best.accuracy,
            "test_accuracy_at_best_val": at_best["test_accuracy"],
        },
        "test_correct": test_correct,  # per test image, of the final model
        "history": epoch_history(training.log_history),
        "sharpness": sharpness,
        "timing": {
            "wall_time_s": wall_time,  # training with its per-epoch validation
            "total_s": time.perf_counter() - start,  # plus the test evaluations and the sharpness
            "train_runtime_s": float(metrics["train_runtime"]),
            "train_samples_per_second": float(metrics["train_samples_per_second"]),
        },
        "argv": flags,
        "hyperparameters": hyperparameters(model_args, data_args, training_args),
        "code": code_version(),
        "environment": (env := environment(torch.get_num_threads())),
        # A re-run gives this record's numbers bit for bit only on this CPU model (its vector instructions) and
        # thread count: another CPU's kernels round differently, and training turns that into other weights.
        "bit_exact_on": {"cpu": env.get("cpu") or env["device"], "threads": env["threads"]},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del training, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record
