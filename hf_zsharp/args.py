"""The arguments of training with hf_zsharp and how `hf-zsharp-train` reads them.

The model and data to use (`ModelArguments`, `DataArguments`), `ZSharpTrainingArguments` (`TrainingArguments`
plus the options of `ZSharpTrainer`), the recipe of `hf-zsharp-train` and its parser (flags and `--config`), and
`ResolvedRun`: every value a run derives from its arguments, resolved once after parsing and handed down frozen.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import re
import tempfile
import textwrap
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open
from transformers import HfArgumentParser, TrainingArguments

from hf_zsharp.catalog import DIGITS, DatasetFacts, dataset_facts, paper_image_size
from hf_zsharp.flags import unrecognized_arguments_message
from hf_zsharp.keys import CARD_NAME, CURVES_NAME, MANIFEST_NAME, ZSHARP_ARGS_NAME
from hf_zsharp.models import CODE_FILES, PAPER_MODELS
from hf_zsharp.optim import METHODS, OPTIONS, Option, stated_settings
from hf_zsharp.support import check_interval, unsupported_error

logger = logging.getLogger(__name__)

SAM_METHODS = (*METHODS, "none")
# `TrainingArguments.optim` values whose optimizer is a plain torch optimizer stepping on `.grad`, which the
# two-pass wrapper can drive. The others step inside backward (LOMO), keep two sets of weights (schedule-free),
# quantise their state (bitsandbytes, torchao) or need a special device (XLA, NPU).
SUPPORTED_BASE_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")


class _SharpnessAwareOptions:
    """What `ZSharpArgumentsMixin` does with its fields (declared below it, from the methods' declarations)."""

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
        for option in OPTIONS:
            option.validate(getattr(self, option.field), option.field)
        check_interval(self.sam_interval, "sam_interval")
        for name, info in METHODS.items():
            ignored = [o.field for o in info.options if getattr(self, o.field) != o.default(info.cls)]
            if ignored and self.sam not in (name, "none"):
                warnings.warn(
                    f"{', '.join(ignored)} only apply to sam={name!r}; ignored for sam={self.sam!r}.",
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
            info = METHODS[self.sam]
            kwargs.update({option.name: getattr(self, option.field) for option in info.options})
            kwargs.update({name: getattr(self, source) for name, source in info.from_run.items()})
        return kwargs


def _option_field(option: Option) -> tuple[str, type, Any]:
    """A dataclass field of `ZSharpArgumentsMixin` for a method's option: the constructor's default and type."""
    info = next(info for info in METHODS.values() if option in info.options)
    default = option.default(info.cls)
    metadata = {"help": option.help, **({"choices": list(option.choices)} if option.choices else {})}
    return option.field, type(default), field(default=default, metadata=metadata)


# The sharpness-aware options of `ZSharpMixin`, for any `TrainingArguments` subclass: put it first, e.g.
# `@dataclass class ZSharpSFTConfig(ZSharpArgumentsMixin, SFTConfig)` for TRL's SFTTrainer. Each method's own
# options come from its optimizer class (`hf_zsharp.optim.OPTIONS`): declaring one there adds its field here.
ZSharpArgumentsMixin = dataclasses.make_dataclass(
    "ZSharpArgumentsMixin",
    [
        (
            "sam",
            str,
            field(
                default="zsharp",
                metadata={
                    "help": "Sharpness-aware method wrapped around the `optim` base optimizer: "
                    + "; ".join(f"'{name}': {info.title}" for name, info in METHODS.items())
                    + "; or 'none' (the base optimizer alone, one pass).",
                    "choices": list(SAM_METHODS),
                },
            ),
        ),
        (
            "sam_rho",
            float | None,
            field(
                default=None,
                metadata={
                    "help": "Ascent radius rho. Default: the method's own ("
                    + ", ".join(f"{name} {info.default_rho}" for name, info in METHODS.items())
                    + ")."
                },
            ),
        ),
        *map(_option_field, OPTIONS),
        (
            "sam_interval",
            int,
            field(
                default=1,
                metadata={
                    "help": "Take the two-pass sharpness-aware step every k optimizer steps and plain "
                    "base-optimizer steps in between (1 = every step)."
                },
            ),
        ),
        (
            "sam_sync_ascent",
            bool,
            field(
                default=False,
                metadata={
                    "help": "Multi-process (DDP) only: all-reduce the first-pass gradient before the ascent, so "
                    "training matches one process on the global batch. Default: each replica perturbs with its "
                    "own gradient and the first pass skips the all-reduce, as in the SAM paper. Under FSDP2 the "
                    "ascent is always synced."
                },
            ),
        ),
    ],
    bases=(_SharpnessAwareOptions,),
)
ZSharpArgumentsMixin.__module__ = __name__
ZSharpArgumentsMixin.__doc__ = (
    "The sharpness-aware options of `ZSharpMixin`, for any `TrainingArguments` subclass."
)


@dataclass
class ZSharpTrainingArguments(ZSharpArgumentsMixin, TrainingArguments):
    """`TrainingArguments` with the sharpness-aware step of `ZSharpTrainer` (ZSharp by default)."""

    _argument_group_name = "Training options (transformers.TrainingArguments, then the sharpness-aware ones)"

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that already holds a run (its files are overwritten, never deleted). "
            "Without it, hf-zsharp-train refuses such a directory."
        },
    )


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
        default=DIGITS,
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


# The recipe of `hf-zsharp-train`, on top of `TrainingArguments`' own defaults: every flag or config-file entry
# overrides it. COMMON applies to every run; the learning-rate recipe depends on the kind of model.
COMMON_RECIPE: dict[str, Any] = {
    "output_dir": "outputs",
    "per_device_train_batch_size": 32,
    "eval_strategy": "epoch",
    "logging_strategy": "epoch",
    "save_strategy": "epoch",
}


class ModelKind(Enum):
    """How a model starts: one of the paper's models from scratch, or a pretrained one (Hub id, folder, timm)."""

    FROM_SCRATCH = "from scratch"
    PRETRAINED = "pretrained"

    @classmethod
    def of(cls, model_name_or_path: str) -> "ModelKind":
        return cls.FROM_SCRATCH if model_name_or_path.lower() in PAPER_MODELS else cls.PRETRAINED


KIND_RECIPES: dict[ModelKind, dict[str, Any]] = {
    # The paper's models from scratch (the embedded default: ResNet-20 on digits, ~1 min on 2 CPU cores).
    ModelKind.FROM_SCRATCH: {
        "num_train_epochs": 4,
        "learning_rate": 3e-3,
        "weight_decay": 5e-5,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "per_device_eval_batch_size": 256,
    },
    # Hub / local / timm checkpoints: the usual fine-tuning recipe of transformers' image-classification example.
    ModelKind.PRETRAINED: {
        "num_train_epochs": 3,
        "learning_rate": 5e-5,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.1,
        "per_device_eval_batch_size": 64,
    },
}
DEFAULT_KIND = ModelKind.of(ModelArguments().model_name_or_path)  # the embedded default's: ResNet-20


def recipe_help() -> str:
    """The default run and the recipe in words, for `--help`."""
    titles = {
        ModelKind.FROM_SCRATCH: "paper models (from scratch)",
        ModelKind.PRETRAINED: "pretrained models (Hub, folder, timm)",
    }
    lines = [
        "Train or fine-tune an image classifier with ZSharp (or a SAM baseline). With no arguments: ResNet-20",
        "from scratch on scikit-learn's digits, offline, on the CPU in about a minute, written to ./outputs.",
        "Options come from flags, from a YAML/JSON file (--config FILE, or the file alone), or both: flags win.",
        "",
        "Defaults (on top of TrainingArguments' own; any flag or config-file entry overrides them):",
    ]
    for title, recipe in (("every run", COMMON_RECIPE), *((titles[k], r) for k, r in KIND_RECIPES.items())):
        options = " ".join(f"--{k} {v}" for k, v in recipe.items())
        lines += textwrap.wrap(options, 100, initial_indent=f"  {title}: ", subsequent_indent="    ")
    lines += textwrap.wrap(
        f"The option defaults shown below are the default model's ({ModelArguments().model_name_or_path}, "
        f"{DEFAULT_KIND.value}); another kind of model takes its line above.",
        100,
    )
    lines += textwrap.wrap(
        " ".join(f"--{name}" for name in _OWN_FIELDS),
        100,
        initial_indent="hf_zsharp's own training options (listed last): ",
        subsequent_indent="  ",
    )
    return "\n".join(lines)


# The options ZSharpTrainingArguments adds to TrainingArguments (the sharpness-aware ones), in their order.
_OWN_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ZSharpTrainingArguments)
    if f.name not in TrainingArguments.__dataclass_fields__
)
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-\d+")  # Trainer's checkpoint folders


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in the help, and the description (the recipe) as written."""


class TrainArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over the model, data and training arguments, with the recipe as defaults and, as TRL's
    parser, `--config FILE` (YAML or JSON) whose values the flags override."""

    def __init__(self) -> None:
        super().__init__(
            (ModelArguments, DataArguments, ZSharpTrainingArguments),
            prog="hf-zsharp-train",
            usage="%(prog)s [--config CONFIG.yaml] [options] | %(prog)s CONFIG.yaml",
            description=recipe_help(),
            formatter_class=_HelpFormatter,
            allow_abbrev=False,  # `--max_step 2` is not silently `--max_steps 2`
        )
        self.add_argument(
            "--config",
            default=None,
            help="A YAML or JSON file of option values; flags given with it override its values.",
        )
        self._field_defaults = {
            key: self.get_default(key) for recipe in KIND_RECIPES.values() for key in recipe
        }
        self._annotations = {
            name: annotation
            for dataclass_type in self.dataclass_types
            for name, annotation in typing.get_type_hints(dataclass_type).items()
        }
        self._use_recipe(DEFAULT_KIND, {})  # what --help shows: the default model's recipe

    def _use_recipe(self, kind: ModelKind, config: Mapping[str, Any]) -> None:
        """Make the option defaults `config`'s values over `kind`'s recipe over the common one over the fields'
        own: each recipe key starts from its field's default, so that one kind's recipe never leaks into
        another's (the from-scratch weight decay into a fine-tuning run)."""
        self.set_defaults(**{**self._field_defaults, **COMMON_RECIPE, **KIND_RECIPES[kind], **config})

    def parse(self, argv: list[str]) -> tuple[ModelArguments, DataArguments, ZSharpTrainingArguments]:
        """Parse flags and a config file over the recipe: flags, then the file, then the model kind's recipe, then
        the common one. A config file alone as the only argument is read as `--config FILE` (transformers' habit)."""
        argv = list(argv)
        if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
            argv = ["--config", argv[0]]
        known, _ = self.parse_known_args(argv)
        config = {} if known.config is None else self._read_config(Path(known.config))
        self._use_recipe(DEFAULT_KIND, config)
        known, unknown = self.parse_known_args(argv)
        if unknown:
            options = [option for action in self._actions for option in action.option_strings]
            raise ValueError(unrecognized_arguments_message(unknown, options))
        self._use_recipe(ModelKind.of(known.model_name_or_path), config)
        model_args, data_args, training_args, _ = self.parse_args_into_dataclasses(argv)
        return model_args, data_args, training_args

    def _read_config(self, path: Path) -> dict[str, Any]:
        """The options of a YAML/JSON file: known names only, each value read as its flag would read it."""
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                config = json.loads(text, object_pairs_hook=_refuse_duplicates)
            else:
                config = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ValueError(f"Cannot read the config file {str(path)!r}: {_one_line(error)}") from error
        if not isinstance(config, dict):
            raise ValueError(f"The config file {str(path)!r} must hold a mapping of option names to values.")
        actions: dict[str, argparse.Action] = {}
        for action in self._actions:  # the option's own action, not its --no_ twin
            if action.dest not in ("help", "config"):
                actions.setdefault(action.dest, action)
        unknown = sorted(str(key) for key in config if key not in actions)
        if unknown:
            named = ", ".join(_with_closest(key, key, list(actions)) for key in unknown)
            raise ValueError(f"The config file {str(path)!r} has unknown options: {named}.")
        for key, value in config.items():
            try:
                config[key] = _config_value(value, self._annotations[key], actions[key])
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                shown = json.dumps(value, default=str)
                takes = _type_words(self._annotations[key])
                detail = "" if isinstance(error, _NotTaken) else f" ({error})"
                raise ValueError(
                    f"The config file {str(path)!r} gives {key}: {shown}, but {key} takes {takes}{detail}."
                ) from error
        return config


_SCALAR_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class _NotTaken(TypeError):
    """A config file's value of a kind its option does not take (a list for a number, null for the seed)."""


def _type_members(annotation: Any) -> tuple[Any, ...]:
    """The types a field's annotation admits: the members of a union, or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _type_word(member: Any) -> str:
    """One admitted type in words, as a config file writes its values (null, a mapping, a list, ...)."""
    origin = typing.get_origin(member) or member
    if member is type(None):
        return "null"
    if origin is dict:
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    if origin is typing.Literal:
        return " or ".join(json.dumps(value) for value in typing.get_args(member))
    if isinstance(member, type) and issubclass(member, Enum):
        return "a string"
    return _SCALAR_WORDS.get(member, getattr(member, "__name__", str(member)))


def _type_words(annotation: Any) -> str:
    """What a field takes, in words: "a number", "a string or null", "null, a string or a list"."""
    words = list(dict.fromkeys(_type_word(member) for member in _type_members(annotation)))
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _config_value(value: Any, annotation: Any, action: argparse.Action) -> Any:
    """A config file's `value` for a field of type `annotation`, read as its flag (`action`) reads it: a scalar
    through the flag's type (wrapped in a list for a list-only field, as the flag collects it), each item of a
    list too, a mapping or null as they are where the field takes them. `_NotTaken` when the field does not take
    such a value: refused at parse time, not found later as an internal failure in TrainingArguments or the run."""
    members = _type_members(annotation)
    takes_list = any(typing.get_origin(m) in (list, tuple) or m in (list, tuple) for m in members)
    takes_scalar = any(m in _SCALAR_WORDS or (isinstance(m, type) and issubclass(m, Enum)) for m in members)

    def scalar(item: Any) -> Any:
        if not isinstance(item, (bool, int, float, str)):
            raise _NotTaken
        return item if action.type is None else action.type(str(item))

    if value is None and type(None) in members:
        return None
    if isinstance(value, dict) and any(typing.get_origin(m) is dict or m is dict for m in members):
        return value
    if isinstance(value, list) and takes_list:
        return [scalar(item) for item in value]
    if isinstance(value, (bool, int, float, str)) and (takes_scalar or takes_list):
        return scalar(value) if takes_scalar else [scalar(value)]
    raise _NotTaken


def _with_closest(text: str, name: str, options: list[str]) -> str:
    """`text`, followed by the option of `options` closest to the unknown `name` when one is close."""
    close = difflib.get_close_matches(name, options, n=1)
    return f"{text} (did you mean {close[0]}?)" if close else text


def _one_line(error: Exception) -> str:
    """An error reading a config file, on one line: a YAML error's problem and where (line, column)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return error.problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return " ".join(str(error).split())


def _refuse_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping from key-value pairs, refusing a key given twice (JSON and YAML would keep the last silently)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"option(s) given more than once: {', '.join(repeated)}")
    return dict(pairs)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2 booleans (only true/false: `yes`, `no`, `on`, `off` stay strings) and no
    duplicate keys. Merge keys (`<<: *base`) work as in the safe loader: a mapping's own keys override the merged
    ones, which is no duplicate; a key written twice in one mapping is."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        own = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        try:
            _refuse_duplicates([(self.construct_object(key, deep=deep), None) for key in own])
        except ValueError as error:
            raise yaml.constructor.ConstructorError(problem=str(error)) from error
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ZSharpTrainingArguments]:
    """`hf-zsharp-train`'s arguments: the recipe, overridden by a YAML/JSON config file, overridden by flags."""
    return TrainArgumentParser().parse(argv)


# What a run writes at the top of its output directory (besides the weight shards of an index): finding one means
# that another run lives there, or that the run would overwrite a file of the user's.
RUN_FILES = (
    "config.json",
    TRAINER_STATE_NAME,
    "training_args.bin",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    CARD_NAME,
    CURVES_NAME,
    ZSHARP_ARGS_NAME,
    MANIFEST_NAME,
    *CODE_FILES,
)


def check_output_dir(run: "ResolvedRun") -> None:
    """Refuse, before any work, an output directory that cannot be written, or that holds another run or files
    this run would overwrite (unless asked to overwrite or resume it), or whose checkpoints Trainer's rotation would delete."""
    training_args = run.training
    output_dir = Path(training_args.output_dir)
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"lies under {str(existing)!r}, which is a file"
        raise ValueError(
            f"Output directory {str(output_dir)!r} {where}; choose a directory with --output_dir."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"Output directory {str(output_dir)!r} cannot be written ({error.strerror or error} in "
            f"{str(existing)!r}); choose another --output_dir."
        ) from error
    check_unfinished(training_args, run.resume_from)
    if not output_dir.is_dir() or run.resume_from:
        return
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
    if not training_args.overwrite_output_dir:
        found = sorted(name for name in RUN_FILES if (output_dir / name).exists()) + checkpoints
        if found:
            resume = " resume its last checkpoint with --resume_from_checkpoint last," if checkpoints else ""
            raise ValueError(
                f"Output directory {str(output_dir)!r} already holds a run, or files this run would overwrite "
                f"({', '.join(found[:5])}). Choose "
                f"another --output_dir,{resume} or pass --overwrite_output_dir to write over it (files are "
                "overwritten, never deleted)."
            )
    if checkpoints and training_args.save_total_limit:
        raise ValueError(
            f"Output directory {str(output_dir)!r} holds checkpoints of another run ({', '.join(checkpoints[:5])}) "
            f"and --save_total_limit {training_args.save_total_limit} would let Trainer's checkpoint rotation "
            "delete them. Choose another --output_dir, move them away, or drop --save_total_limit."
        )


def check_unfinished(training_args: ZSharpTrainingArguments, checkpoint: str | None) -> None:
    """Refuse resuming from the checkpoint that ends a finished run, with the same length: Trainer's loop would
    train one step past the end and overwrite the run's results."""
    if not checkpoint:
        return
    state = checkpoint_state(checkpoint)
    step, max_steps = state["global_step"], state.get("max_steps", 0)
    if training_args.max_steps > 0:
        finished = step >= training_args.max_steps
    else:
        finished = (
            step >= max_steps
            and training_args.num_train_epochs <= state.get("num_train_epochs", 0)
            and training_args.train_batch_size == state.get("train_batch_size")
        )
    if finished:
        raise ValueError(
            f"--resume_from_checkpoint: {str(checkpoint)!r} is the end of a finished run "
            f"(step {step} of {max(training_args.max_steps, 0) or max_steps}), and resuming it would train a step "
            "past the end. Raise --max_steps or --num_train_epochs to train further, or choose another --output_dir."
        )


def checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (its step, epoch and log history); a ValueError naming the file when it
    cannot be read or holds no step."""
    path = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(path)!r} cannot be read ({error})") from error
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{str(path)!r} is not a trainer state (it holds no global_step)")
    return state


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a run could not go on from `checkpoint` as it was saved, naming the file; None when it can. Trainer
    would fail on an unreadable trainer state or weights with errors that name no file, and without the
    optimizer or scheduler state it would silently restart both: Adam's moments and the warm-up."""
    if not checkpoint.is_dir():
        return f"{str(checkpoint)!r} is not a folder"
    try:
        checkpoint_state(checkpoint)
    except ValueError as error:
        return str(error)
    for weights in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{str(weights)!r} cannot be read, it may be truncated ({error})"
    names = {entry.name for entry in checkpoint.iterdir()}
    if any(name.startswith("global_step") for name in names):
        return None  # DeepSpeed's own folder holds its optimizer and scheduler states
    missing = [
        name
        for name, found in (
            ("optimizer.pt", any(name.startswith("optimizer") for name in names)),  # or FSDP's optimizer_0/
            ("scheduler.pt", "scheduler.pt" in names),
        )
        if not found
    ]
    if missing:
        return (
            f"{str(checkpoint)!r} has no {' or '.join(missing)}, so resuming it would restart the optimizer's "
            "state (such as Adam's moments) and the learning-rate schedule, warm-up included"
        )
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest `checkpoint-N` folder of `output_dir` that a run can go on from (None if there is none), and the
    problem of each newer one, newest first (`checkpoint_problem`: a run stopped while saving, a file deleted)."""
    folder = Path(output_dir)
    found = (
        [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
        if folder.is_dir()
        else []
    )
    problems = []
    for checkpoint in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, problems
        problems.append(problem)
    return None, problems


def resume_checkpoint(training_args: ZSharpTrainingArguments) -> str | None:
    """The checkpoint folder to resume from, refused before training when the run could not go on from it as it
    was saved (`checkpoint_problem`): `--resume_from_checkpoint` as given, or for `true` / `last` (as in the
    transformers examples) the output directory's newest complete checkpoint, with a warning naming each newer
    one and what it lacks."""
    given = training_args.resume_from_checkpoint
    advice = (
        "Resume another checkpoint (`--resume_from_checkpoint last` takes the newest complete one), or start a "
        "new run."
    )
    if str(given).lower() not in ("true", "last"):
        problem = checkpoint_problem(Path(given)) if given else None
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint: {problem}. {advice}")
        return given or None
    output_dir = training_args.output_dir
    checkpoint, problems = newest_complete_checkpoint(output_dir)
    if checkpoint is None and not problems:
        raise ValueError(
            f"--resume_from_checkpoint {given}: {str(output_dir)!r} holds no checkpoint-* folder to resume from; "
            "pass a checkpoint folder, or leave the flag out."
        )
    if checkpoint is None:
        raise ValueError(
            f"--resume_from_checkpoint {given}: no checkpoint of {str(output_dir)!r} is complete; the newest: "
            f"{problems[0]}. Start a new run, or pass a checkpoint folder."
        )
    for problem in problems:
        logger.warning("Resuming %s, not a newer incomplete checkpoint: %s.", checkpoint.name, problem)
    return str(checkpoint)


@dataclass(frozen=True)
class ResolvedRun:
    """A training run as `run_training` carries it out, resolved once from the user's arguments, which nothing
    changes afterwards: what the model is, its input size, the dataset's known facts, the sharpness-aware
    method's settings with their defaults (rho included), where a push goes and which checkpoint a resume reads.
    `trainer_args` is the Trainer's own copy: the method's resolved settings, and no Trainer push (the run
    publishes what it wrote itself, after the card exists)."""

    model: ModelArguments
    data: DataArguments
    training: ZSharpTrainingArguments
    trainer_args: ZSharpTrainingArguments
    kind: ModelKind
    image_size: int | None  # the paper models' input side; None for a pretrained model (its processor's)
    dataset: DatasetFacts | None
    sam_settings: Mapping[str, Any]  # keyed as a run states them (`sam_rho`, `zsharp_percentile`, ...)
    push_to: str | None  # the Hub repo a --push_to_hub run publishes to
    resume_from: str | None


def resolve_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ZSharpTrainingArguments,
    *,
    sam_rho: float | None = None,
) -> ResolvedRun:
    """Resolve every derived value of a run from its parsed arguments (which stay as they are). `sam_rho`
    overrides the arguments' radius (the reproduction's `sam-matched` scales it by the model's tensor count)."""
    kind = ModelKind.of(model_args.model_name_or_path)
    image_size = None
    if kind is ModelKind.FROM_SCRATCH:
        image_size = model_args.image_size or paper_image_size(data_args.dataset_name)
    trainer_args = copy.copy(training_args)
    trainer_args.push_to_hub = False  # the run's own push, after the card exists (hub.RunOutputs)
    settings: dict[str, Any] = {}
    if training_args.sam in METHODS:
        kwargs = training_args.sam_kwargs()
        if sam_rho is not None:
            kwargs["rho"] = sam_rho
        resolved = METHODS[training_args.sam].resolve(kwargs)
        trainer_args.sam_rho = resolved["rho"]
        settings = stated_settings(training_args.sam, resolved)
    push_to = None
    if training_args.push_to_hub:
        push_to = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
    return ResolvedRun(
        model=model_args,
        data=data_args,
        training=training_args,
        trainer_args=trainer_args,
        kind=kind,
        image_size=image_size,
        dataset=dataset_facts(data_args.dataset_name),
        sam_settings=MappingProxyType(settings),
        push_to=push_to,
        resume_from=resume_checkpoint(training_args),
    )
