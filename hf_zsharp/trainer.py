"""`ZSharpMixin`: the two-pass sharpness-aware step (ZSharp by default) for `transformers.Trainer` or any of its
subclasses (TRL's SFTTrainer, ...), and `ZSharpTrainer = ZSharpMixin + Trainer`.

What changes from the host trainer: the optimizer (the `optim` base optimizer wrapped by the chosen SAM method),
`training_step` (the two passes, see `hf_zsharp.two_pass`; the host's per-step metrics count the pass at w once),
`log` (ascent statistics), the resume (the checkpoint's method and settings must be this run's) and the model card
(an image classifier gets hf_zsharp's card; any other model keeps the host's card with a ZSharp section added).
`_save` only undoes FSDP2's class swap so that saved models record their own code. Clipping, mixed precision, the
LR scheduler, checkpoints and callbacks are the host's own.
"""

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import Trainer

from hf_zsharp._compat import BatchNorm, check_trainer_hooks
from hf_zsharp.args import ZSharpArgumentsMixin, ZSharpTrainingArguments
from hf_zsharp.cards import (
    add_sam_section,
    public_settings,
    save_zsharp_args,
    tokens_in_use,
    write_model_card,
)
from hf_zsharp.optim import METHODS, SAM, create_sam_optimizer, stated_settings
from hf_zsharp.optim.sam import method_keys
from hf_zsharp.support import check_supported
from hf_zsharp.two_pass import TwoPassStep, inner_optimizer, unwrap_sam_optimizer

check_trainer_hooks(Trainer)


class ZSharpMixin:
    """Put it first: `class ZSharpSFTTrainer(ZSharpMixin, SFTTrainer)`, with arguments that include
    `ZSharpArgumentsMixin` (`@dataclass class ZSharpSFTConfig(ZSharpArgumentsMixin, SFTConfig)`); `sam="none"`
    makes it the host trainer unchanged."""

    # The host trainer's attributes that its training step updates with per-step metrics (TRL's token count,
    # entropy and token accuracy): kept as the first pass left them, so each optimizer step counts once, at w.
    second_pass_restores: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(training_args, ZSharpArgumentsMixin):
            raise TypeError(
                f"{type(self).__name__} needs arguments with the sharpness-aware options (ZSharpTrainingArguments, "
                f"or a dataclass with ZSharpArgumentsMixin first); got {type(training_args).__name__}."
            )
        super().__init__(*args, **kwargs)
        check_fsdp2_batchnorm(self.model, self.accelerator)
        self._two_pass: TwoPassStep | None = None
        if self.args.sam != "none":
            check_supported(self.accelerator)
            if self.optimizer is not None and not isinstance(self.optimizer, SAM):
                raise ValueError(
                    f"optimizers= gave a {type(self.optimizer).__name__}, which cannot take a two-pass step: pass an "
                    "hf_zsharp optimizer (e.g. hf_zsharp.ZSharp), or let the trainer build one from the arguments, "
                    "or set sam='none'."
                )

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The `optim` base optimizer (with `Trainer`'s weight-decay groups) wrapped by the `sam` method."""
        if self.args.sam == "none" or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            base_cls, base_kwargs = self.optimizer_cls_and_kwargs
        else:
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not (isinstance(base_cls, type) and issubclass(base_cls, Optimizer)):
            raise ValueError(f"The base optimizer must be a torch.optim.Optimizer class; got {base_cls!r}.")
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = create_sam_optimizer(
            self.args.sam,
            [group for group in groups if group["params"]],
            base_cls,
            **self.args.sam_kwargs(),
            **base_kwargs,
        )
        return self.optimizer

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The host's `training_step` as the first pass; the second pass runs at the step's last micro-batch."""
        first_pass = functools.partial(super().training_step, model, inputs, num_items_in_batch)
        if self.args.sam == "none":
            return first_pass()
        two_pass = self._two_pass
        if (
            two_pass is None
            or two_pass.model is not model
            or two_pass.optimizer is not unwrap_sam_optimizer(self.optimizer)
        ):
            self._two_pass = TwoPassStep(
                self.accelerator,
                model,
                self.optimizer,
                self.args.sam_sync_ascent,
                loss_shares=True,
                second_pass=self._host_metrics_kept,
            )
        return self._two_pass(first_pass, perturb=self.state.global_step % self.args.sam_interval == 0)

    @contextlib.contextmanager
    def _host_metrics_kept(self) -> Iterator[None]:
        """Inside, the host's per-step metric state (`second_pass_restores`) may change; after, it is as before."""
        kept = {
            name: copy.deepcopy(vars(self)[name]) for name in self.second_pass_restores if name in vars(self)
        }
        try:
            yield
        finally:
            for name, value in kept.items():
                setattr(self, name, value)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The host's resume of the optimizer state, refusing a checkpoint of another method or other settings
        (the loaded parameter groups would silently replace this run's rho, percentile, ...)."""
        optimizer = inner_optimizer(self.optimizer)
        optimizer = optimizer if isinstance(optimizer, SAM) else None
        asked = optimizer.method_settings() if optimizer is not None else None
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if optimizer is None:
            saved = [key for key in method_keys() if key in inner_optimizer(self.optimizer).param_groups[0]]
            if saved:
                raise ValueError(
                    f"--resume_from_checkpoint: {checkpoint} was trained with a sharpness-aware method (its optimizer "
                    f"holds {', '.join(saved)}), this run with sam='none'. Resume with the checkpoint's --sam."
                )
            return
        found = optimizer.method_settings()
        if found != asked:
            keys = stated_settings(self.args.sam, asked)
            differ = [
                f"{key} {found[option]!r} (this run: {asked[option]!r})"
                for key, option in zip(keys, asked)
                if found[option] != asked[option]
            ]
            raise ValueError(
                f"--resume_from_checkpoint: {checkpoint} was trained with {', '.join(differ)}. Resume with the "
                "checkpoint's settings (the run would mix them), or start a new run from its weights."
            )

    def stated_settings(self) -> dict[str, Any]:
        """What the run states it did (card, zsharp_args.json): its arguments, token-free, with the sharpness-aware
        method's options as its optimizer uses them (defaults resolved: rho included)."""
        settings = public_settings(self.args)
        if self.args.sam == "none":
            return settings
        optimizer = inner_optimizer(self.optimizer)
        if isinstance(optimizer, SAM):
            values = optimizer.method_settings()
        else:  # before training: what create_optimizer will build
            values = METHODS[self.args.sam].resolve(self.args.sam_kwargs())
        return {**settings, **stated_settings(self.args.sam, values)}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The host's `_save`; under FSDP2, as the model's own class (see `_own_class`)."""
        with _own_class(self.model) if self.is_fsdp_enabled else contextlib.nullcontext():
            super()._save(output_dir, state_dict)

    def create_model_card(self, *args: Any, settings: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """An image classifier trained by a plain `Trainer` host gets hf_zsharp's card (method, settings, results,
        training curves; `cards.write_model_card`); any other model or host keeps the host's card, to which the
        ZSharp section and settings are added. `settings` (default `stated_settings()`) are what the card and
        zsharp_args.json state; `metrics` default to the last evaluation logged."""
        if not self.is_world_process_zero():
            return
        settings = self.stated_settings() if settings is None else settings
        host = super().create_model_card
        if host.__func__ is not Trainer.create_model_card or not _image_classifier(self.model):
            accepted = inspect.signature(host).parameters
            host(*args, **{k: v for k, v in kwargs.items() if k in accepted})
            add_sam_section(Path(self.args.output_dir), settings, tokens_in_use(self.args))
            save_zsharp_args(self.args.output_dir, settings)
            return
        self._write_image_card(settings, *args, **kwargs)

    def _write_image_card(
        self,
        settings: dict[str, Any],
        *,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        dataset_split: str | None = None,
        metrics: dict[str, Any] | None = None,
        repo_id: str | None = None,
        **ignored: Any,
    ) -> None:
        if metrics is None:
            metrics = next((entry for entry in reversed(self.state.log_history) if "eval_loss" in entry), {})
        write_model_card(
            self.args.output_dir,
            settings=settings,
            metrics=metrics,
            log_history=self.state.log_history,
            model_name=model_name,
            base_model=finetuned_from,
            dataset_name=dataset[0] if isinstance(dataset, list) else dataset,
            dataset_split=dataset_split,
            repo_id=repo_id,
            secrets=tokens_in_use(self.args),
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the ascent statistics (means since the last training log) to the training logs."""
        if self._two_pass is not None and "loss" in logs:
            logs.update(self._two_pass.pop_stats())
        super().log(logs, start_time)


class ZSharpTrainer(ZSharpMixin, Trainer):
    """A drop-in `Trainer` taking `ZSharpTrainingArguments`; `sam="none"` makes it a stock `Trainer`."""

    def __init__(
        self, model: nn.Module | None = None, args: ZSharpTrainingArguments | None = None, **kwargs: Any
    ):
        if args is None:
            args = ZSharpTrainingArguments(output_dir="tmp_trainer")
        super().__init__(model=model, args=args, **kwargs)


def _image_classifier(model: nn.Module) -> bool:
    """Whether `model` is an image classifier (transformers' `...ForImageClassification` naming, which the paper
    models, timm's wrapper and FSDP2's class swap keep)."""
    return type(model).__name__.endswith("ForImageClassification")


@contextlib.contextmanager
def _own_class(model: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2 model has its own class back.

    FSDP2 swaps in a subclass defined in torch (FSDP<Model>), which `save_pretrained` would record as the code of
    a custom model (a config `auto_map` that does not load) and copy torch's sources for.
    """
    from torch.distributed.fsdp import FSDPModule

    wrapper = type(model)
    if not issubclass(wrapper, FSDPModule):
        yield
        return
    model.__class__ = next(cls for cls in wrapper.__bases__ if not issubclass(cls, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = wrapper


def check_fsdp2_batchnorm(model: nn.Module | None, accelerator: Any) -> None:
    """Refuse, before training, bf16 mixed precision under FSDP2 for a model with BatchNorm: FSDP2 casts the
    BatchNorm weights to bf16 beside float32 running statistics, and the first forward fails."""
    if model is None or not getattr(accelerator, "is_fsdp2", False) or accelerator.mixed_precision != "bf16":
        return
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BatchNorm)})
    if norms:
        raise ValueError(
            f"FSDP2 with bf16 mixed precision cannot train this model: it has {', '.join(norms)} layers, whose bf16 "
            "weights FSDP2 would use beside float32 running statistics. Train it with --mixed_precision no "
            "(accelerate launch) or without --bf16, or without FSDP."
        )
