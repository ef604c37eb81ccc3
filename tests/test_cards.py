"""Model card rendering: Hub metadata, body, training curves, and no token in any written file."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from hf_zsharp.cards import (
    CURVES_NAME,
    ZSHARP_ARGS_NAME,
    plot_training_curves,
    public_settings,
    render_model_card,
    save_zsharp_args,
    write_model_card,
)

FAKE_TOKEN = "hf_SECRETtoken123"

SETTINGS = {
    "sam": "zsharp",
    "sam_rho": 0.05,
    "zsharp_percentile": 0.95,
    "sam_radius": "tensor",
    "sam_mask": "zscore",
    "sam_interval": 1,
    "optim": "adamw_torch",
    "learning_rate": 1e-3,
    "weight_decay": 5e-5,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 64,
    "bf16": True,
    "fp16": False,
    "seed": 7,
    "hub_token": FAKE_TOKEN,
    "push_to_hub_token": FAKE_TOKEN,
    "model_init_kwargs": {"token": FAKE_TOKEN, "revision": "main"},
}
METRICS = {
    "eval_accuracy": 0.8125,
    "eval_top5_accuracy": 0.96875,
    "eval_loss": 0.61,
    "eval_runtime": 1.5,
    "epoch": 3.0,
}
LOG_HISTORY = [
    {"loss": 2.1, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 5},
    {"loss": 1.6, "epoch": 1.0, "step": 10},
    {"eval_loss": 1.2, "eval_accuracy": 0.55, "eval_top5_accuracy": 0.9, "epoch": 1.0, "step": 10},
    {"loss": 1.0, "epoch": 2.0, "step": 20},
    {"eval_loss": 0.8, "eval_accuracy": 0.7, "epoch": 2.0, "step": 20},
    {"loss": 0.7, "epoch": 3.0, "step": 30},
    {"eval_loss": 0.61, "eval_accuracy": 0.8125, "epoch": 3.0, "step": 30},
    {"train_runtime": 12.0, "train_loss": 1.3, "epoch": 3.0, "step": 30},
]


def _save_config(folder, model_type, processor=True):
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if processor:
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_processor_type": "ViTImageProcessor"})
        )


def _assert_no_token(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), f"token leaked into {path.name}"


def test_fine_tuned_card_metadata_and_body(tmp_path):
    _save_config(tmp_path, "vit")
    path = write_model_card(
        tmp_path,
        settings=SETTINGS,
        metrics=METRICS,
        log_history=LOG_HISTORY,
        base_model="google/vit-base-patch16-224-in21k",
        dataset_name="uoft-cs/cifar10",
        dataset_split="test",
        repo_id="someone/vit-cifar10-zsharp",
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.base_model == "google/vit-base-patch16-224-in21k"
    assert data.datasets == ["uoft-cs/cifar10"]
    assert {"zsharp", "sharpness-aware-minimization", "image-classification"} <= set(data.tags)
    assert data.metrics == ["accuracy"]
    assert data.model_name == "vit-cifar10-zsharp"
    results = {r.metric_name: r for r in data.eval_results}
    assert results["Top-1 accuracy"].metric_value == pytest.approx(0.8125)
    assert results["Top-5 accuracy"].metric_value == pytest.approx(0.96875)
    assert results["Top-1 accuracy"].dataset_type == "uoft-cs/cifar10"
    assert results["Top-1 accuracy"].dataset_split == "test"

    body = card.text
    for row in (
        "| Method | `zsharp`:",
        "| rho (ascent radius) | 0.05 |",
        "| Z-score percentile Q_p | 0.95 |",
        "| Radius normalisation | tensor |",
        "| Mask | zscore |",
        "| Perturbation interval (steps) | 1 |",
        "| Base optimizer | adamw_torch |",
        "| Learning rate | 0.001 |",
        "| Schedule | cosine, warm-up 10% of steps |",
        "| Epochs | 3 |",
        "| Batch size per device | 64 |",
        "| Precision | bf16 mixed |",
        "| Top-1 accuracy (test) | 0.8125 |",
        "| Top-5 accuracy (test) | 0.9688 |",
    ):
        assert row in body, row
    assert "runtime" not in body
    assert f"]({CURVES_NAME})" in body
    assert 'pipeline("image-classification", model="someone/vit-cifar10-zsharp")' in body
    assert "trust_remote_code" not in body and "import hf_zsharp" not in body
    assert "arXiv:2505.02369" in body and "Vincent-Daniel" in body and "foret2021" in body
    for framework in ("torch", "transformers", "accelerate", "datasets", "hf_zsharp"):
        assert f"- {framework} " in body
    assert "{{" not in body and "{%" not in body

    with Image.open(tmp_path / CURVES_NAME) as image:
        assert image.format == "PNG" and image.size[0] > 300
    saved = json.loads((tmp_path / ZSHARP_ARGS_NAME).read_text())
    assert saved["zsharp_percentile"] == 0.95 and saved["model_init_kwargs"] == {"revision": "main"}
    _assert_no_token(tmp_path)


def test_from_scratch_card_without_eval_or_curves(tmp_path):
    _save_config(tmp_path, "hf_zsharp_unregistered_type", processor=False)
    local_data = tmp_path / "my_images"
    local_data.mkdir()
    settings = {"sam": "none", "sam_rho": 0.05, "optim": "adamw_torch", "learning_rate": 0.1, "fp16": False}
    path = write_model_card(
        tmp_path,
        settings=settings,
        metrics={"train_loss": 0.4},
        log_history=[{"train_runtime": 3.0, "train_loss": 0.4, "epoch": 1.0}],
        dataset_name=str(local_data),
    )
    card = ModelCard.load(path)
    assert card.data.base_model is None
    assert card.data.datasets is None
    assert card.data.eval_results is None
    assert card.data.model_name == tmp_path.name
    assert "trained from scratch" in card.text
    assert "rho" not in card.text
    assert "| Precision | fp32 |" in card.text
    assert "| Training loss (mean over the run) | 0.4 |" in card.text
    assert not (tmp_path / CURVES_NAME).exists() and CURVES_NAME not in card.text
    assert "import hf_zsharp.models" in card.text  # the alternative to the shipped code
    assert "pipeline" not in card.text  # no image processor
    assert f'from_pretrained("{tmp_path}", trust_remote_code=True)' in card.text


def test_local_base_model_stays_out_of_metadata(tmp_path):
    card = render_model_card(
        model_name="resnet-asam",
        settings={"sam": "asam", "sam_rho": 0.5, "zsharp_percentile": 0.95},
        metrics={"test_accuracy": 0.25},
        model_path="out",
        base_model=str(tmp_path),
        dataset_name="digits",
    )
    assert card.data.base_model is None and card.data.datasets is None
    assert "asam" in card.data.tags and "zsharp" in card.data.tags
    assert f"fine-tuned version of `{tmp_path}` on `digits`" in card.text
    assert card.data.eval_results[0].metric_value == pytest.approx(0.25)
    assert "| rho (ascent radius) | 0.5 |" in card.text and "percentile" not in card.text


def test_unknown_method_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="settings\\['sam'\\] must be one of"):
        write_model_card(tmp_path, settings={"sam": "adam"}, metrics={}, log_history=LOG_HISTORY)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a directory"):
        write_model_card(tmp_path / "missing", settings=SETTINGS, metrics={})


def test_training_curves_png_with_and_without_eval(tmp_path):
    full = plot_training_curves(LOG_HISTORY, tmp_path / "full.png")
    train_only = plot_training_curves([e for e in LOG_HISTORY if "loss" in e], tmp_path / "train.png")
    for path in (full, train_only):
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    assert full.read_bytes() != train_only.read_bytes()
    # The ascent statistics get a panel of their own when they were logged.
    ascent = [
        {**e, "sam_perturbation_norm": 0.2, "sam_kept_fraction": 0.1} if "loss" in e else e
        for e in LOG_HISTORY
    ]
    with Image.open(plot_training_curves(ascent, tmp_path / "ascent.png")) as image, Image.open(full) as two:
        assert image.size[0] == 3 * two.size[0] // 2  # three panels instead of two
    with pytest.raises(ValueError, match="no 'loss'"):
        plot_training_curves([{"train_runtime": 1.0}], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_public_settings_from_training_arguments_drops_tokens(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), hub_token=FAKE_TOKEN, report_to="none")
    clean = public_settings(args)
    assert "hub_token" not in clean and clean["learning_rate"] == args.learning_rate
    assert clean["optim"] == args.optim.value
    json.dumps(clean)

    hub_shaped = "hf_" + "A1b2C3d4" * 5
    assert public_settings({"sam": "sam", "note": hub_shaped, "ids": ["x", hub_shaped]}) == {
        "sam": "sam",
        "ids": ["x"],
    }
    with pytest.raises(TypeError, match="dict or a dataclass"):
        public_settings(["sam"])

    path = save_zsharp_args(tmp_path, args)
    assert path.name == ZSHARP_ARGS_NAME and FAKE_TOKEN not in path.read_text()


def test_every_method_option_is_declared_once_and_derives_its_field_check_row_and_record():
    """A method's option is declared on its optimizer class (`Option`); the arguments' field with the
    constructor's default, the check of a bad value, the card's row and the stated key all follow from it."""
    import dataclasses

    from hf_zsharp.args import ZSharpTrainingArguments
    from hf_zsharp.cards import _METHOD_ROWS
    from hf_zsharp.optim import METHODS, OPTIONS

    fields = {f.name: f for f in dataclasses.fields(ZSharpTrainingArguments)}
    for info in METHODS.values():
        for option in info.options:
            assert fields[option.field].default == option.default(info.cls)
            assert _METHOD_ROWS[option.field] == option.label
            assert info.setting_key(option.name) == option.field
    assert len({o.field for o in OPTIONS}) == len(OPTIONS)  # one field per option
    with pytest.raises(ValueError, match=r"fsam_lmbda: must be in \[0, 1\), got 1\.5"):
        ZSharpTrainingArguments(output_dir="out", sam="fsam", fsam_lmbda=1.5)
    with pytest.raises(ValueError, match="lmbda: must be in"):
        METHODS["fsam"].cls(
            [torch.nn.Parameter(torch.zeros(2))], lmbda=1.5
        )  # the constructor checks the same


def test_a_curve_of_one_point_is_drawn_as_a_visible_marker(tmp_path, monkeypatch):
    """A short run logs one point per curve: each is drawn as a marker (a line of one point would not show), in
    every panel, rather than the figure being skipped."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    one_point = [
        {"loss": 1.1, "sam_perturbation_norm": 0.2, "epoch": 0.25, "step": 2},
        {"eval_loss": 1.2, "eval_accuracy": 0.3, "epoch": 0.25, "step": 2},
    ]
    plot_training_curves(one_point, tmp_path / "curves.png")
    (figure,) = drawn
    lines = [line for axes in figure.axes for line in axes.get_lines()]
    assert len(lines) == 4  # training and evaluation loss, accuracy, perturbation norm
    assert all(
        len(line.get_xdata()) == 1 and line.get_marker() == "o" and line.get_markersize() > 0
        for line in lines
    )
