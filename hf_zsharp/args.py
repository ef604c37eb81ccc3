"""The arguments of training with hf_zsharp: the model and data to use (`ModelArguments`, `DataArguments`, read by
`hf-zsharp-train`) and `ZSharpTrainingArguments`, `TrainingArguments` plus the options of `ZSharpTrainer`."""

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType
from transformers import TrainingArguments

from hf_zsharp.models import PAPER_MODELS
from hf_zsharp.optim import MASKS, METHODS, RADII, ZSharp
from hf_zsharp.two_pass import check_interval, unsupported_error

SAM_METHODS = (*METHODS, "none")
# `TrainingArguments.optim` values whose optimizer is a plain torch optimizer stepping on `.grad`, which the
# two-pass wrapper can drive. The others step inside backward (LOMO), keep two sets of weights (schedule-free),
# quantise their state (bitsandbytes, torchao) or need a special device (XLA, NPU).
SUPPORTED_BASE_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")
_ZSHARP = inspect.signature(ZSharp).parameters


@dataclass
class ZSharpTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the sharpness-aware step of `ZSharpTrainer` (ZSharp by default)."""

    sam: str = field(
        default="zsharp",
        metadata={
            "help": "Sharpness-aware method wrapped around the `optim` base optimizer: "
            + "; ".join(f"'{name}': {info.title}" for name, info in METHODS.items())
            + "; or 'none' (the base optimizer alone, one pass).",
            "choices": list(SAM_METHODS),
        },
    )
    sam_rho: float | None = field(
        default=None,
        metadata={
            "help": "Ascent radius rho. Default: the method's own ("
            + ", ".join(f"{name} {info.default_rho}" for name, info in METHODS.items())
            + ")."
        },
    )
    zsharp_percentile: float = field(
        default=_ZSHARP["percentile"].default,
        metadata={
            "help": "ZSharp only: entries of each filtered gradient tensor with |z-score| above this quantile are "
            "kept for the ascent (0.95 keeps about one entry in twenty)."
        },
    )
    sam_radius: str = field(
        default=_ZSHARP["radius"].default,
        metadata={
            "help": "ZSharp only: normalise the filtered ascent per tensor ('tensor', the paper's code) or over "
            "all tensors at once ('global').",
            "choices": list(RADII),
        },
    )
    sam_mask: str = field(
        default=_ZSHARP["mask"].default,
        metadata={
            "help": "ZSharp only: which gradient entries to keep: 'zscore' (the method), the ablation controls "
            "'magnitude' (largest |g|) and 'random' at the same sparsity, or 'none' (every entry: SAM normalised "
            "per tensor).",
            "choices": list(MASKS),
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={
            "help": "Take the two-pass sharpness-aware step every k optimizer steps and plain base-optimizer "
            "steps in between (1 = every step)."
        },
    )
    sam_sync_ascent: bool = field(
        default=False,
        metadata={
            "help": "Multi-process (DDP) only: all-reduce the first-pass gradient before the ascent, so training "
            "matches one process on the global batch. Default: each replica perturbs with its own gradient and "
            "the first pass skips the all-reduce, as in the SAM paper. Under FSDP2 the ascent is always synced."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that already holds a run (its files are overwritten, never deleted). "
            "Without it, hf-zsharp-train refuses such a directory."
        },
    )

    def __post_init__(self) -> None:
        # Checked before TrainingArguments' own set-up, which would already initialise DeepSpeed/FSDP.
        if self.sam not in SAM_METHODS:
            raise ValueError(f"sam must be one of {', '.join(SAM_METHODS)}; got {self.sam!r}.")
        if self.sam != "none" and self.deepspeed:
            raise unsupported_error(DistributedType.DEEPSPEED)
        if self.sam_rho is not None and not (math.isfinite(self.sam_rho) and self.sam_rho > 0):
            raise ValueError(
                f"sam_rho must be a positive number (or None for the method default); got {self.sam_rho}."
            )
        if not 0.0 <= self.zsharp_percentile < 1.0:
            raise ValueError(
                f"zsharp_percentile must lie in [0, 1) (0 disables the filter: plain SAM); got "
                f"{self.zsharp_percentile}."
            )
        if self.sam_radius not in RADII:
            raise ValueError(f"sam_radius must be one of {', '.join(RADII)}; got {self.sam_radius!r}.")
        if self.sam_mask not in MASKS:
            raise ValueError(f"sam_mask must be one of {', '.join(MASKS)}; got {self.sam_mask!r}.")
        check_interval(self.sam_interval, "sam_interval")
        ignored = [
            field_name
            for option, field_name in METHODS["zsharp"].options.items()
            if self.sam not in ("zsharp", "none")
            and field_name != "seed"
            and getattr(self, field_name) != _ZSHARP[option].default
        ]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} only apply to sam='zsharp'; ignored for sam={self.sam!r}.",
                stacklevel=2,
            )
        if not self.use_cpu and not torch.accelerator.is_available():
            # On a machine without an accelerator, Accelerate runs torchrun's processes as one DDP group (gloo)
            # only when told use_cpu; otherwise each process would train alone into the same output_dir.
            self.use_cpu = True
        super().__post_init__()
        if self.sam != "none" and self.fsdp and (self.fsdp_plugin_args or {}).get("fsdp_version") != 2:
            raise unsupported_error(DistributedType.FSDP)  # FSDP1 (or XLA's FSDP); FSDP2 is supported
        optim = getattr(self.optim, "value", self.optim)
        if self.sam != "none" and optim not in SUPPORTED_BASE_OPTIMS:
            raise ValueError(
                f"optim={optim!r} cannot be the base of a two-pass sharpness-aware optimizer; use one of "
                f"{', '.join(SUPPORTED_BASE_OPTIMS)} (or sam='none')."
            )

    def sam_kwargs(self) -> dict[str, object]:
        """The keyword arguments of the `sam` method's constructor: rho (if set) and the options it reads."""
        kwargs: dict[str, object] = {} if self.sam_rho is None else {"rho": self.sam_rho}
        if self.sam in METHODS:
            kwargs.update({option: getattr(self, name) for option, name in METHODS[self.sam].options.items()})
        return kwargs


@dataclass
class ModelArguments:
    """Which model to train."""

    _argument_group_name = "Model options"

    model_name_or_path: str = field(
        default="resnet20",
        metadata={
            "help": "A Hub model id or local folder (any AutoModelForImageClassification model: ViT, ResNet, ...; "
            f"timm Hub models such as timm/resnet50.a1_in1k), or a paper model trained from scratch: {', '.join(PAPER_MODELS)}."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input resolution of the paper's from-scratch models (default: 16 for digits, 64 for "
            "Tiny-ImageNet, 32 otherwise). Pretrained models use their image processor's."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    _argument_group_name = "Data options"

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

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"--{name} must be at least 1 (or left out to use the whole split); got {value}."
                )
