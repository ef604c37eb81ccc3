"""Model cards for ZSharp-trained image classifiers: Hub metadata, settings, results and training curves.

The card is `huggingface_hub.ModelCard.from_template` over the Jinja template `hf_zsharp/templates/model_card.md`
(also reachable as the top-level `model_cards/`), with the YAML metadata built by `ModelCardData` so the Hub can
index it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainingArguments

from hf_zsharp.keys import CARD_NAME, CURVES_NAME, LOGGED_STATISTICS, ZSHARP_ARGS_NAME
from hf_zsharp.optim import METHODS, OPTIONS

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"

METHOD_TITLES = {
    **{name: info.title for name, info in METHODS.items()},
    "none": "the base optimizer alone (no sharpness-aware step)",
}
TAGS = ("zsharp", "sharpness-aware-minimization", "image-classification")
FRAMEWORKS = ("torch", "transformers", "accelerate", "datasets", "hf_zsharp")

_SECRET_KEY = re.compile(r"(token|secret|password)$", re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
REDACTED = "<redacted>"
# settings key -> row label, in table order: the sharpness-aware rows a method reads (every method reads rho and
# the interval, each its own options, declared on its optimizer class; "none" reads none), then the rows of every run.
_METHOD_ROWS = {
    "sam_rho": "rho (ascent radius)",
    **{option.field: option.label for option in OPTIONS},
    "sam_interval": "Perturbation interval (steps)",
}
# The section added to a host trainer's own card (a language model's, TRL's, ...), between these markers.
_SECTION_START, _SECTION_END = "<!-- hf_zsharp -->", "<!-- /hf_zsharp -->"
_RUN_ROWS = {
    "optim": "Base optimizer",
    "learning_rate": "Learning rate",
    "weight_decay": "Weight decay",
    "lr_scheduler_type": "Schedule",
    "num_train_epochs": "Epochs",
    "max_steps": "Training steps",
    "per_device_train_batch_size": "Batch size per device",
    "gradient_accumulation_steps": "Gradient accumulation steps",
    "world_size": "Processes",
    "seed": "Seed",
}
_METRIC_LABELS = {
    "accuracy": "Top-1 accuracy",
    "top5_accuracy": "Top-5 accuracy",
    "loss": "Evaluation loss",
    "train_loss": "Training loss (mean over the run)",
    "train_loss_since_resume": "Training loss (mean since the run was resumed)",
    "epoch": "Epochs run",
}


def public_settings(settings: Mapping[str, Any] | Any, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Training settings as a JSON-ready dict with every token/secret removed, from a dict, a `TrainingArguments`
    or another dataclass: keys ending in token, secret or password are dropped, values shaped like a Hub token
    too, and any other value containing such a token, or one of the tokens in use (`tokens_in_use`), has it
    replaced by REDACTED (e.g. a run name or path made with a token in it)."""
    if hasattr(settings, "to_dict") and dataclasses.is_dataclass(settings):
        raw = settings.to_dict()
    elif dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        raw = dataclasses.asdict(settings)
    elif isinstance(settings, Mapping):
        raw = dict(settings)
    else:
        raise TypeError(f"settings must be a dict or a dataclass, got {type(settings).__name__}")
    if isinstance(settings, TrainingArguments):
        raw["world_size"] = settings.world_size  # processes, for the total batch size
    return _scrub(raw, tokens_in_use(settings, [*secrets, *_secret_values(raw)]))


def tokens_in_use(settings: Any = None, secrets: Iterable[Any] = ()) -> list[str]:
    """The Hub tokens a run may hold: `secrets`, the settings' `hub_token` and the token of the environment or
    login (`huggingface_hub.get_token`); longest first."""
    hub_token = (
        settings.get("hub_token") if isinstance(settings, Mapping) else getattr(settings, "hub_token", None)
    )
    found = {
        value for value in (*secrets, hub_token, get_token()) if isinstance(value, str) and len(value) >= 8
    }
    return sorted(found, key=len, reverse=True)


def redact_tokens(text: str, tokens: Iterable[str]) -> str:
    """`text` with each of `tokens`, and anything shaped like a Hub token, replaced by REDACTED."""
    for token in tokens:
        text = text.replace(token, REDACTED)
    return _HF_TOKEN.sub(REDACTED, text)


def _secret_values(value: Any) -> list[Any]:
    """The values under secret keys, at any depth."""
    if isinstance(value, Mapping):
        return [
            found
            for k, v in value.items()
            for found in ([v] if _SECRET_KEY.search(str(k)) else _secret_values(v))
        ]
    if isinstance(value, (list, tuple)):
        return [found for v in value for found in _secret_values(v)]
    return []


def _scrub(value: Any, tokens: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): _scrub(v, tokens)
            for k, v in value.items()
            if not _SECRET_KEY.search(str(k)) and not _looks_like_token(v)
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v, tokens) for v in value if not _looks_like_token(v)]
    if isinstance(value, Enum):
        return _scrub(value.value, tokens)
    if isinstance(value, (str, Path)):
        return redact_tokens(str(value), tokens)
    return value


def _looks_like_token(value: Any) -> bool:
    return isinstance(value, str) and bool(_HF_TOKEN.fullmatch(value))


def save_zsharp_args(output_dir: str | Path, settings: Mapping[str, Any] | Any) -> Path:
    """Write the token-free training settings to `zsharp_args.json`, the record uploaded next to the weights."""
    path = Path(output_dir) / ZSHARP_ARGS_NAME
    text = json.dumps(public_settings(settings), indent=2, sort_keys=True, default=str)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# The panels of training_curves.png: title, y label, and the curves drawn (label -> log_history key).
_PANELS = (
    ("Loss", "loss", {"Training loss": "loss", "Evaluation loss": "eval_loss"}),
    (
        "Evaluation accuracy",
        "accuracy",
        {"Top-1 accuracy": "eval_accuracy", "Top-5 accuracy": "eval_top5_accuracy"},
    ),
    (
        "Sharpness-aware ascent",
        "mean per training log",
        dict(
            zip(
                ("Perturbation norm", "Kept fraction", "Loss increase L(w+e) - L(w)"),
                LOGGED_STATISTICS[:3],  # all but the skipped-step count
                strict=True,
            )
        ),
    ),
)


def _series(log_history: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) points per curve of `_PANELS` from a `Trainer.state.log_history`; empty curves left out."""
    keys = {label: key for *_, curves in _PANELS for label, key in curves.items()}
    series = {label: [] for label in keys}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        for label, key in keys.items():
            if isinstance(entry.get(key), (int, float)):
                series[label].append((float(entry["epoch"]), float(entry[key])))
    return {label: points for label, points in series.items() if points}


def plot_training_curves(log_history: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Draw loss, evaluation accuracy and (when logged) the ascent statistics against epochs into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = _series(log_history)
    if not any(label in series for label in (*_PANELS[0][2], *_PANELS[1][2])):
        raise ValueError("log_history holds no 'loss', 'eval_loss' or 'eval_accuracy' entry with an 'epoch'")
    panels = [panel for panel in _PANELS[:2]] + [
        p for p in _PANELS[2:] if any(label in series for label in p[2])
    ]
    figure = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, ylabel, curves) in zip(figure.subplots(1, len(panels)), panels):
        drawn = [label for label in curves if label in series]
        for label in drawn:
            epochs, values = zip(*series[label], strict=True)
            axes.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
        if drawn:
            axes.legend()
        else:
            axes.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center", transform=axes.transAxes)
        axes.set(title=title, xlabel="epoch", ylabel=ylabel)
        axes.grid(alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def render_model_card(
    *,
    model_name: str,
    settings: Mapping[str, Any] | Any,
    metrics: Mapping[str, Any],
    model_path: str,
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    curves_file: str | None = None,
    has_processor: bool = True,
    needs_hf_zsharp: bool = False,
    description: str | None = None,
) -> ModelCard:
    """Render the card: Hub metadata (with a model-index when an accuracy is known) and the template body.

    `base_model` is the Hub id or folder a model was fine-tuned from (None when trained from scratch; only a
    Hub id enters the metadata); `model_path` is the repo id or folder shown in the loading snippet.
    """
    clean = public_settings(settings)
    method = str(clean.get("sam", ""))
    if method not in METHOD_TITLES:
        raise ValueError(f"settings['sam'] must be one of {sorted(METHOD_TITLES)}, got {clean.get('sam')!r}")
    scores = _scores(metrics)
    base_model_id = base_model if base_model and _is_hub_id(base_model) else None
    dataset_id = dataset_name if dataset_name and "/" in dataset_name and _is_hub_id(dataset_name) else None

    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model_id,
        datasets=[dataset_id] if dataset_id else None,
        tags=list(TAGS) + ([method] if method not in ("zsharp", "none") else []),
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        model_name=model_name,
        eval_results=_eval_results(scores, dataset_name, dataset_id, dataset_split) or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        description=description or _description(method, base_model, base_model_id, dataset_name, dataset_id),
        method=method,
        method_title=METHOD_TITLES[method],
        settings_rows=_settings_rows(clean, method),
        results_rows=_results_rows(metrics, dataset_split),
        curves_file=curves_file,
        model_path=model_path,
        has_processor=has_processor,
        needs_hf_zsharp=needs_hf_zsharp,
        versions=[(name, _version(name)) for name in FRAMEWORKS],
    )


def write_model_card(
    output_dir: str | Path,
    *,
    settings: Mapping[str, Any] | Any,
    metrics: Mapping[str, Any],
    log_history: Iterable[Mapping[str, Any]] = (),
    model_name: str | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    repo_id: str | None = None,
    description: str | None = None,
    secrets: Iterable[str] = (),
) -> Path:
    """Write README.md, the training-curves PNG and zsharp_args.json into a saved model folder.

    Call after `save_model` (and the image processor's `save_pretrained`): the loading snippet adapts to
    what the folder holds. `secrets`: tokens to redact besides those `settings` holds. Returns the card's path.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is not a directory; save the model there first")
    log_history = list(log_history)
    has_curves = bool(_series(log_history))
    card = render_model_card(
        model_name=model_name or (repo_id.rsplit("/", 1)[-1] if repo_id else output_dir.resolve().name),
        settings=settings,
        metrics=metrics,
        model_path=repo_id or str(output_dir),
        base_model=base_model,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        curves_file=CURVES_NAME if has_curves else None,
        has_processor=(output_dir / "preprocessor_config.json").is_file(),
        needs_hf_zsharp=_needs_hf_zsharp(output_dir),
        description=description,
    )
    if has_curves:
        plot_training_curves(log_history, output_dir / CURVES_NAME)
    save_zsharp_args(output_dir, settings)
    path = output_dir / CARD_NAME
    path.write_text(redact_tokens(str(card), tokens_in_use(settings, secrets)), encoding="utf-8")
    return path


def add_sam_section(output_dir: Path, settings: Mapping[str, Any] | Any, secrets: Iterable[str] = ()) -> Path:
    """Add to the host trainer's card in `output_dir` (README.md, written by e.g. TRL) what hf_zsharp did: the
    method, the settings table and the tags; the card's own task, metadata and text stay. Replaces the section an
    earlier call added, so cards rewritten at each checkpoint hold it once. Returns the card's path."""
    clean = public_settings(settings)
    method = str(clean.get("sam", ""))
    path = output_dir / CARD_NAME
    card = (
        ModelCard.load(path) if path.is_file() else ModelCard(f"---\n---\n\n# {output_dir.resolve().name}\n")
    )
    rows = "\n".join(f"| {label} | {value} |" for label, value in _settings_rows(clean, method))
    section = (
        f"{_SECTION_START}\n## Sharpness-aware training\n\nThe weights were optimised with **{METHOD_TITLES[method]}** "
        "through the `hf_zsharp` package: each optimizer step takes two forward/backward passes, the second at "
        "weights moved up the loss by the ascent of radius rho, and the base optimizer updates the original weights "
        "with the second gradient. The training metrics above count each step once, at the original weights.\n\n"
        f"| Setting | Value |\n|---|---|\n{rows}\n{_SECTION_END}"
    )
    text = card.text
    if _SECTION_START in text and _SECTION_END in text:
        before, rest = text.split(_SECTION_START, 1)
        text = before + section + rest.split(_SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    card.data.tags = sorted(
        {*(card.data.tags or []), *TAGS[:2], *([method] if method not in ("zsharp", "none") else [])}
    )
    path.write_text(redact_tokens(str(card), tokens_in_use(settings, secrets)), encoding="utf-8")
    return path


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def _scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Top-1/top-5 accuracy from Trainer metrics, with or without the eval_/test_ prefix."""
    scores = {}
    for name, aliases in (
        ("accuracy", ("accuracy",)),
        ("top5_accuracy", ("top5_accuracy", "top_5_accuracy")),
    ):
        for key in (f"{prefix}{alias}" for alias in aliases for prefix in ("eval_", "test_", "")):
            if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics[key], bool):
                scores[name] = float(metrics[key])
                break
    return scores


def _eval_results(
    scores: Mapping[str, float], dataset_name: str | None, dataset_id: str | None, split: str | None
) -> list[EvalResult]:
    names = {"accuracy": "Top-1 accuracy", "top5_accuracy": "Top-5 accuracy"}
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or dataset_name or "custom",
            dataset_name=dataset_name or "custom",
            dataset_split=split,
            metric_type="accuracy",
            metric_name=names[key],
            metric_config="top5" if key == "top5_accuracy" else None,
            metric_value=value,
        )
        for key, value in scores.items()
    ]


def _description(
    method: str,
    base_model: str | None,
    base_model_id: str | None,
    dataset_name: str | None,
    dataset_id: str | None,
) -> str:
    if dataset_id:
        dataset = f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})"
    else:
        dataset = f"`{dataset_name}`" if dataset_name else "an image classification dataset"
    if base_model_id:
        origin = (
            f"a fine-tuned version of [{base_model_id}](https://huggingface.co/{base_model_id}) on {dataset}"
        )
    elif base_model:
        origin = f"a fine-tuned version of `{base_model}` on {dataset}"
    else:
        origin = f"an image classifier trained from scratch on {dataset}"
    return f"This model is {origin}, optimised with {METHOD_TITLES[method]} using the `hf_zsharp` package."


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _settings_rows(settings: Mapping[str, Any], method: str) -> list[tuple[str, str]]:
    rows = [("Method", f"`{method}`: {METHOD_TITLES[method]}")]
    info = METHODS.get(method)
    read = {"sam_rho", "sam_interval", *(option.field for option in info.options)} if info else set()
    labels = {key: label for key, label in _METHOD_ROWS.items() if key in read} | _RUN_ROWS
    # --max_steps > 0 replaces the epochs (Trainer's rule); -1 or 0 leaves them.
    del labels["num_train_epochs" if (settings.get("max_steps") or -1) > 0 else "max_steps"]
    for key, label in labels.items():
        if settings.get(key) is not None:
            value = _format(settings[key])
            if key == "lr_scheduler_type":
                value += _warmup(settings)
            rows.append((label, value))
    factors = [
        settings.get(key)
        for key in ("per_device_train_batch_size", "world_size", "gradient_accumulation_steps")
    ]
    if all(isinstance(factor, int) for factor in factors):
        rows.append(("Total batch size", str(math.prod(factors))))
    if "bf16" in settings or "fp16" in settings:
        precision = "bf16 mixed" if settings.get("bf16") else "fp16 mixed" if settings.get("fp16") else "fp32"
        rows.append(("Precision", precision))
    return rows


def _warmup(settings: Mapping[str, Any]) -> str:
    ratio, steps = settings.get("warmup_ratio") or 0, settings.get("warmup_steps") or 0
    if 0 < steps < 1:
        ratio, steps = steps, 0
    if steps:
        return f", warm-up {_format(steps)} steps"
    return f", warm-up {ratio:.0%} of steps" if ratio else ""


def _results_rows(metrics: Mapping[str, Any], split: str | None) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or _SECRET_KEY.search(key):
            continue
        if key.endswith(("runtime", "per_second", "_flos")):
            continue
        name = key.removeprefix("eval_")
        label = _METRIC_LABELS.get(name, name.replace("_", " "))
        if key.startswith("eval_") and split:
            label += f" ({split})"
        rows.append((label, _format(value)))
    return rows


def _needs_hf_zsharp(output_dir: Path) -> bool:
    """Whether the saved config's model type is one of hf_zsharp's own (loading then needs the import)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = output_dir / "config.json"
    if not config.is_file():
        return False
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    return model_type is not None and model_type not in CONFIG_MAPPING_NAMES


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
