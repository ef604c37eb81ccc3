"""`hf-zsharp-train` end to end: generated datasets with the Hub schemas, tiny local models, the fake Hub."""

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_hub import RecordingApi
from huggingface_hub import ModelCard
from transformers import TrainerCallback

from hf_zsharp import hub
from hf_zsharp.args import COMMON_RECIPE, ModelKind, parse_train_args, resolve_run
from hf_zsharp.cli import choose_threads, train_main
from hf_zsharp.run import run_training

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16",
    "--save_strategy", "no",
    "--report_to", "none",
    "--use_cpu",
    "--disable_tqdm", "true",
]  # fmt: skip
TOKEN = "hf_SECRETtoken1234567890abcdefghijklmnop"
SMALL = ["--max_train_samples", "64", "--max_eval_samples", "32"]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny pretrained-style ViT (config, weights, image processor) saved locally, as from the Hub."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """A tiny timm model saved as transformers' timm wrapper saves a Hub checkpoint: an ImageNet-1k head, whose
    1000 class names the config carries as `label_names`."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    path = tmp_path_factory.mktemp("models") / "tiny-timm"
    config = TimmWrapperConfig.from_dict(
        {
            "architecture": "test_resnet",
            "num_classes": 1000,
            "pretrained_cfg": {
                "tag": "r160_in1k", "input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear",
                "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 1000, "classifier": "fc",
            },
        }
    )  # fmt: skip
    assert len(config.id2label) == 1000
    TimmWrapperForImageClassification(config).save_pretrained(path)
    return path


def train(*argv: str) -> None:
    train_main([str(a) for a in argv])


def test_finetune_a_local_vit_on_cifar10_schema(tmp_path, cifar10_dir, tiny_vit):
    out = tmp_path / "out"
    train("--model_name_or_path", tiny_vit, "--dataset_name", cifar10_dir, "--output_dir", out, *FAST)
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 10 and config["id2label"]["0"] == "airplane"
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_top5_accuracy" in results
    card = ModelCard.load(out / "README.md")
    assert "zsharp" in card.data.tags and card.data.base_model is None  # a local folder is not a Hub id
    assert (out / "preprocessor_config.json").is_file() and (out / "zsharp_args.json").is_file()
    assert_pipeline_reproduces_the_evaluation(out, cifar10_dir, count=20)


def test_finetuning_a_timm_model_keeps_the_datasets_class_names(tmp_path, imagefolder_dir, tiny_timm):
    """timm's wrapper saves `label_names` (not id2label): the source's 1000 ImageNet names would stay, and
    pipeline() would answer LABEL_0, LABEL_1, ... instead of the dataset's classes."""
    from PIL import Image
    from transformers import pipeline

    out = tmp_path / "out"
    train("--model_name_or_path", tiny_timm, "--dataset_name", imagefolder_dir, "--output_dir", out, *FAST)
    assert json.loads((out / "config.json").read_text())["label_names"] == ["cat", "dog", "fish"]
    classifier = pipeline("image-classification", model=str(out))
    with Image.open(next((imagefolder_dir / "test" / "dog").iterdir())) as image:
        labels = [answer["label"] for answer in classifier(image.convert("RGB"))]
    assert sorted(labels) == ["cat", "dog", "fish"]


def test_sharpness_aware_statistics_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train(
        "--output_dir",
        out,
        *FAST,
        *SMALL,
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "1",
        "--logging_strategy",
        "steps",
    )
    (run,) = out.glob("runs/*")  # one run folder, holding the event files of training and evaluation
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert {
        "train/loss",
        "train/sam_perturbation_norm",
        "train/sam_kept_fraction",
        "train/sam_skipped_steps",
        "train/sam_loss_increase",
    } <= set(tags)


def test_paper_model_on_tiny_imagenet_schema_finds_the_valid_split(tmp_path, tiny_imagenet_dir):
    out = tmp_path / "out"
    train(
        "--model_name_or_path", "resnet20", "--image_size", "32", "--dataset_name", tiny_imagenet_dir,
        "--sam", "sam", "--output_dir", out, *FAST,
    )  # fmt: skip
    args = json.loads((out / "zsharp_args.json").read_text())
    assert args["sam"] == "sam"
    assert json.loads((out / "all_results.json").read_text())["eval_samples_per_second"] > 0


def test_cifar100_fine_labels_and_a_yaml_config(tmp_path, cifar100_dir):
    out = tmp_path / "out"
    config = {
        "model_name_or_path": "vgg16", "dataset_name": str(cifar100_dir), "output_dir": str(out),
        "sam": "zsharp", "sam_mask": "magnitude", "max_steps": 1, "per_device_train_batch_size": 4,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True,
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    train(tmp_path / "run.yaml")
    saved = json.loads((out / "config.json").read_text())
    assert (
        len(saved["id2label"]) == 100 and saved["id2label"]["1"] == "aquarium_fish"
    )  # fine, not coarse (20)
    assert json.loads((out / "zsharp_args.json").read_text())["sam_mask"] == "magnitude"


@pytest.fixture
def fake_hub(monkeypatch):
    """A recording HfApi behind hf_zsharp.hub, with the Hub online and no ambient token."""
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", lambda *args, **kwargs: api)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/hf_token")
    return api


def test_push_to_hub_uploads_the_model_and_card_without_the_token(tmp_path, fake_hub):
    out = tmp_path / "out"
    train(
        "--output_dir", out, *FAST, *SMALL,
        "--push_to_hub", "--hub_model_id", "someone/zsharp-digits", "--hub_token", TOKEN,
    )  # fmt: skip
    assert [call[0] for call in fake_hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1] == fake_hub.calls[2][1] == "someone/zsharp-digits"
    files = fake_hub.uploaded
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "training_curves.png",
        "zsharp_args.json",
        "all_results.json",
    } <= set(files)
    assert not any(name.endswith((".bin", ".pt")) or "checkpoint" in name for name in files)
    assert all(TOKEN.encode() not in content for content in files.values())
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert TOKEN not in path.read_text(errors="ignore"), path
    assert "someone/zsharp-digits" in files["README.md"].decode()
    assert json.loads((out / hub.MANIFEST_NAME).read_text())["files"] == sorted(
        files
    )  # what the run published


def test_a_token_inside_another_setting_is_redacted_before_it_is_written(tmp_path, fake_hub):
    out = tmp_path / "out"
    train(
        "--output_dir", out, *FAST, *SMALL, "--run_name", f"run-{TOKEN}-1",
        "--push_to_hub", "--hub_model_id", "someone/zsharp-digits", "--hub_token", TOKEN,
    )  # fmt: skip
    assert json.loads((out / "zsharp_args.json").read_text())["run_name"] == "run-<redacted>-1"
    assert "zsharp_args.json" in fake_hub.uploaded
    assert all(TOKEN.encode() not in content for content in fake_hub.uploaded.values())
    for path in out.glob("*"):
        if path.is_file() and path.suffix in (".json", ".md"):
            assert TOKEN not in path.read_text(), path


def test_a_finished_run_says_where_its_results_are_and_the_card_states_steps_and_batch_once(tmp_path, capsys):
    out = tmp_path / "out"
    train("--output_dir", out, *FAST, *SMALL, "--num_train_epochs", "3")
    summary = capsys.readouterr().out
    assert f"Results in {out}: " in summary and "model.safetensors" in summary and "README.md" in summary
    assert "training_curves.png" in summary and "eval_accuracy" in summary
    assert "1 process(es), total batch size 8" in summary
    card = (out / "README.md").read_text()
    assert "| Training steps | 2 |" in card and "| Epochs |" not in card  # --max_steps replaces the epochs
    assert "| Processes | 1 |" in card and "| Total batch size | 8 |" in card and "| Epochs run |" in card
    # The default run states the rho its optimizer used (the method's default), not "null" and no row.
    assert "| rho (ascent radius) | 0.05 |" in card and "| Z-score percentile Q_p | 0.95 |" in card
    assert json.loads((out / "zsharp_args.json").read_text())["sam_rho"] == 0.05


def test_small_models_on_the_cpu_take_one_thread_unless_omp_num_threads_is_set(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        choose_threads(ModelKind.of("resnet20"), use_cpu=True)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        choose_threads(ModelKind.of("some/vit"), use_cpu=True)  # a pretrained model keeps torch's default
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        choose_threads(ModelKind.of("resnet20"), use_cpu=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_push_uploads_only_what_the_run_wrote(tmp_path, fake_hub):
    out = tmp_path / "out"
    out.mkdir()
    (out / "customer_results.json").write_text('{"private": true}')
    (out / "old_private_model.safetensors").write_bytes(b"private weights")
    train("--output_dir", out, *FAST, *SMALL, "--overwrite_output_dir", "--push_to_hub", "--hub_token", TOKEN)
    assert "model.safetensors" in fake_hub.uploaded and "all_results.json" in fake_hub.uploaded
    assert "customer_results.json" not in fake_hub.uploaded
    assert "old_private_model.safetensors" not in fake_hub.uploaded
    assert (out / "customer_results.json").read_text() == '{"private": true}'


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategy_pushes_the_model_card_and_checkpoints_as_trainer_does(tmp_path, fake_hub, strategy):
    out = tmp_path / "out"
    steps = [
        "--max_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
    ]
    train(
        "--output_dir", out, *FAST, *SMALL, *steps, "--push_to_hub", "--hub_token", TOKEN, "--hub_strategy", strategy,
        "--hub_revision", "zsharp-run", "--hub_always_push",
    )  # fmt: skip
    uploads = [call[2] for call in fake_hub.calls if call[0] == "upload_folder"]
    assert {upload["revision"] for upload in uploads} == {"zsharp-run"}  # every upload, to the branch
    assert all(call[2]["branch"] == "zsharp-run" for call in fake_hub.calls if call[0] == "create_branch")
    model_pushes = [u for u in uploads if u["path_in_repo"] is None]
    checkpoint_pushes = [u["path_in_repo"] for u in uploads if u["path_in_repo"] is not None]
    # One commit per save (steps 2 and 4) while training, then the final one.
    assert len(model_pushes) == (1 if strategy == "end" else 3)
    assert model_pushes[-1]["commit_message"] == "Upload model trained with ZSharp"
    expected = {"end": [], "every_save": [], "checkpoint": ["last-checkpoint"] * 2}
    assert checkpoint_pushes == expected.get(strategy, ["checkpoint-2", "checkpoint-4"])
    for push in model_pushes:  # each carries the model with a current card and curves, never a checkpoint
        assert {"model.safetensors", "README.md", "training_curves.png"} <= set(push["files"])
        assert not any("checkpoint" in name for name in push["files"])
    if checkpoint_pushes:
        folder = checkpoint_pushes[-1]
        assert {
            f"{folder}/optimizer.pt",
            f"{folder}/trainer_state.json",
            f"{folder}/model.safetensors",
        } <= set(fake_hub.uploaded)
        assert f"{folder}/training_args.bin" not in fake_hub.uploaded
    assert all(TOKEN.encode() not in content for content in fake_hub.uploaded.values())


def test_a_slow_push_during_training_does_not_hold_the_steps(tmp_path, fake_hub):
    """As Trainer: checkpoint pushes run in the background, a save while one runs is not pushed, and the run waits
    for the last push before its final one. The fake upload blocks until training has ended."""
    fake_hub.upload_gate = threading.Event()
    seen = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = fake_hub.upload_gate.is_set()

        def on_train_end(self, args, state, control, **kwargs):
            seen["uploads started during training"] = len(fake_hub.background_threads)
            fake_hub.upload_gate.set()

    steps = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1"]
    argv = [
        "--output_dir",
        str(tmp_path / "out"),
        *FAST,
        *SMALL,
        *steps,
        "--push_to_hub",
        "--hub_token",
        TOKEN,
    ]
    run_training(resolve_run(*parse_train_args([*argv, "--hub_strategy", "every_save"])), callbacks=[Watch()])
    # Every step ended while the first push was still uploading; the saves at steps 2-4 were not pushed.
    assert seen == {1: False, 2: False, 3: False, 4: False, "uploads started during training": 1}
    messages = [call[2]["commit_message"] for call in fake_hub.calls if call[0] == "upload_folder"]
    assert messages == ["Training in progress, step 1", "Upload model trained with ZSharp"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("offline", "HF_HUB_OFFLINE is set"),
        ("no token", "needs a Hub token"),
        ("unreachable", "cannot be reached or refused the token"),
    ],
)
def test_push_prerequisites_fail_before_training(tmp_path, fake_hub, monkeypatch, setup, message):
    token = ["--hub_token", TOKEN]
    if setup == "offline":
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    elif setup == "no token":
        token = []
    else:
        fake_hub.whoami_error = OSError("Name or service not known")
    with pytest.raises(SystemExit, match=message):
        train("--output_dir", tmp_path / "out", *FAST, "--push_to_hub", *token)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_failed_push_after_training_keeps_the_results_and_says_how_to_push(tmp_path, fake_hub):
    fake_hub.upload_error = ConnectionError("connection reset")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train("--output_dir", out, *FAST, *SMALL, "--push_to_hub", "--hub_token", TOKEN)
    message = str(exit_info.value)
    assert message.startswith("error: Training finished and its results are saved in")
    assert "connection reset" in message and "hf upload" in message and "\n" not in message
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def card_usage_code(card_text: str) -> str:
    """The Python block of a model card's "How to use" section."""
    section = card_text.split("## How to use", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_embedded_default_runs_with_no_arguments(tmp_path, monkeypatch, capsys):
    """`hf-zsharp-train` alone: the default recipe into ./outputs (shortened here by extending the recipe)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(COMMON_RECIPE, "max_steps", 3)
    monkeypatch.setitem(COMMON_RECIPE, "max_eval_samples", 50)
    train_main([])
    out = tmp_path / "outputs"
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert "\n# resnet20-digits-zsharp\n" in card.text  # a model name, not the folder's
    assert "| Evaluation loss |" in card.text and "| Training loss (mean over the run) |" in card.text
    # The card's "How to use" works as written, on one of the dataset's own images.
    from hf_zsharp.data import load_digits_dataset

    load_digits_dataset()["test"][0]["image"].save(tmp_path / "image.png")
    code = card_usage_code(card.text)
    assert 'pipeline("image-classification", model="outputs", trust_remote_code=True)' in code
    exec(code, {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert eval(printed)[0]["label"] in [str(d) for d in range(10)]
    assert_pipeline_reproduces_the_evaluation(out, "digits", count=50)


def assert_pipeline_reproduces_the_evaluation(out, dataset_name, count):
    """transformers.pipeline on the saved folder sees the evaluation's pixels and scores the run's accuracy
    (on the first `count` evaluation images, those the run evaluated)."""
    import torch
    from transformers import pipeline

    from hf_zsharp.data import decode_image, load_image_dataset
    from hf_zsharp.image_data import paper_transforms, processor_transforms

    results = json.loads((out / "all_results.json").read_text())
    classifier = pipeline("image-classification", model=str(out), trust_remote_code=True)
    dataset = load_image_dataset(str(dataset_name))
    image_column, label_column = "image", "labels"
    evaluation = dataset["eval"].select(range(count))
    images = [decode_image(value) for value in evaluation[image_column]]
    processor = classifier.image_processor
    if "cifar_resnet" in (out / "config.json").read_text():
        eval_transform = paper_transforms(
            processor.image_mean, processor.image_std, processor.size["height"]
        )[1]
    else:
        eval_transform = processor_transforms(processor)[1]
    expected = torch.stack([eval_transform(image) for image in images])
    seen = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        seen, expected, rtol=0, atol=1e-5
    )  # float32 rescale/normalise in another order
    predictions = [top[0]["label"] for top in classifier(images, top_k=1)]
    names = dataset["eval"].features[label_column].names
    accuracy = sum(p == names[y] for p, y in zip(predictions, evaluation[label_column])) / len(images)
    assert accuracy == pytest.approx(results["eval_accuracy"])


def test_flags_apply_on_top_of_the_default_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_args, data_args, args = parse_train_args(["--sam", "sam"])
    assert (args.sam, args.output_dir, args.learning_rate, args.num_train_epochs) == (
        "sam",
        "outputs",
        3e-3,
        4,
    )
    assert (model_args.model_name_or_path, data_args.dataset_name, args.lr_scheduler_type.value) == (
        "resnet20",
        "digits",
        "cosine",
    )
    # A pretrained model gets the fine-tuning recipe, unless the flags say otherwise.
    _, _, tuned = parse_train_args(["--model_name_or_path", "google/vit-base-patch16-224-in21k"])
    assert (tuned.learning_rate, tuned.num_train_epochs, tuned.warmup_steps) == (5e-5, 3, 0.1)
    _, _, chosen = parse_train_args(["--model_name_or_path", "some/vit", "--learning_rate", "1e-4"])
    assert chosen.learning_rate == 1e-4
    # A config file gets the same recipe under it.
    (tmp_path / "run.yaml").write_text("sam: asam\nnum_train_epochs: 2\n")
    _, _, from_file = parse_train_args([str(tmp_path / "run.yaml")])
    assert (from_file.sam, from_file.num_train_epochs, from_file.learning_rate) == ("asam", 2, 3e-3)


def test_a_config_file_and_flags_together_flags_win(tmp_path):
    """As TRL's parser: `--config FILE` sets options, flags override them, the recipe fills in the rest."""
    config = tmp_path / "run.yaml"
    config.write_text("sam: asam\nnum_train_epochs: 2\nmodel_name_or_path: some/vit\nlearning_rate: 1.0e-3\n")
    _, _, args = parse_train_args(["--config", str(config), "--num_train_epochs", "7", "--sam_rho", "0.2"])
    assert (args.sam, args.num_train_epochs, args.sam_rho, args.learning_rate) == ("asam", 7, 0.2, 1e-3)
    assert args.warmup_steps == 0.1  # the pretrained recipe, chosen by the file's model
    (tmp_path / "bad.json").write_text('{"sam": "sam", "learning_rat": 0.1}')
    with pytest.raises(ValueError, match=r"unknown options: learning_rat \(did you mean learning_rate\?\)\."):
        parse_train_args(["--config", str(tmp_path / "bad.json")])


def test_abbreviated_or_unknown_flags_are_refused_with_the_closest_option():
    with pytest.raises(ValueError, match=r"arguments: --max_step 2 \(did you mean --max_steps\?\); `hf-"):
        parse_train_args(["--max_step", "2"])
    with pytest.raises(ValueError, match=r"--learning-rat=0.1 \(did you mean --learning-rate\?\)"):
        parse_train_args(["--learning-rat=0.1"])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("dup.json", '{"sam": "sam", "sam": "asam"}', "given more than once: sam"),
        ("dup.yaml", "sam: sam\nseed: 1\nsam: asam\n", "given more than once: sam"),
        ("type.yaml", "per_device_train_batch_size: 2.5\n", "gives per_device_train_batch_size: 2.5"),
        (
            "type.json",
            '{"learning_rate": "fast"}',
            'gives learning_rate: "fast", but learning_rate takes a number',
        ),
        # Values of a type the option never takes: refused at parse time, naming the key and what it takes.
        (
            "list.yaml",
            "learning_rate: [1, 2]\n",
            r"gives learning_rate: \[1, 2\], but learning_rate takes a number\.",
        ),
        ("null.yaml", "seed: null\n", "gives seed: null, but seed takes an integer."),
        (
            "map.yaml",
            "output_dir: {a: 1}\n",
            'gives output_dir: {"a": 1}, but output_dir takes a string or null.',
        ),
        ("bool.yaml", "use_cpu: maybe\n", 'gives use_cpu: "maybe", but use_cpu takes true or false'),
        ("merged.yaml", "<<: {seed: 1}\nsam: sam\nsam: asam\n", "given more than once: sam"),
    ],
)
def test_a_bad_config_file_names_the_key(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        parse_train_args(["--config", str(tmp_path / name)])
    assert "\n" not in str(error.value)


def test_a_config_value_of_each_type_the_option_takes_is_read_as_its_flag(tmp_path):
    """Null where the option takes it, a mapping for a dict option, a list for a list option (a scalar for a
    list-only one becomes a list of one, as with the flag), a YAML boolean as the flag reads it."""
    (tmp_path / "run.yaml").write_text(
        "sam_rho: null\nlr_scheduler_kwargs: {num_cycles: 2}\nlabel_names: labels\ninclude_for_metrics: [inputs]\n"
        "use_cpu: true\nreport_to: [none]\n"
    )
    _, _, args = parse_train_args([str(tmp_path / "run.yaml")])
    assert (args.sam_rho, args.lr_scheduler_kwargs, args.label_names) == (None, {"num_cycles": 2}, ["labels"])
    assert (args.include_for_metrics, args.use_cpu, args.report_to) == (["inputs"], True, [])


def test_yaml_merge_keys_work_as_in_the_safe_loader_and_own_keys_override(tmp_path):
    import yaml

    from hf_zsharp.args import _ConfigLoader

    text = "base: &base {a: 1, b: 2}\nmore: &more {b: 3, c: 4}\nrun:\n  <<: [*base, *more]\n  c: 5\n"
    assert yaml.load(text, Loader=_ConfigLoader) == yaml.safe_load(text)  # noqa: S506 (a SafeLoader)
    assert yaml.load(text, Loader=_ConfigLoader)["run"] == {"a": 1, "b": 2, "c": 5}  # noqa: S506
    (tmp_path / "run.yaml").write_text("<<: {sam: asam, num_train_epochs: 2}\nnum_train_epochs: 5\n")
    _, _, args = parse_train_args([str(tmp_path / "run.yaml")])
    assert (args.sam, args.num_train_epochs) == ("asam", 5)


def test_yaml_yes_stays_a_string_and_booleans_read_as_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("run_name: yes\nuse_cpu: true\nsam_sync_ascent: false\nseed: 3\n")
    _, _, args = parse_train_args([str(tmp_path / "run.yaml")])
    assert (args.run_name, args.use_cpu, args.sam_sync_ascent, args.seed) == ("yes", True, False, 3)


def test_help_lists_model_data_and_sharpness_options_first_and_the_recipe(capsys):
    with pytest.raises(SystemExit):
        train("--help")
    text = capsys.readouterr().out
    order = [text.index(title) for title in ("Model options:", "Data options:", "Training options")]
    assert order == sorted(order)
    recipe = text[: text.index("Model options:")]
    assert "--sam_rho" in recipe and "--config" in text
    assert text.index("--learning_rate LEARNING_RATE") < text.index("--sam_rho SAM_RHO")
    assert "--learning_rate 0.003" in recipe and "--learning_rate 5e-05" in recipe and "./outputs" in recipe
    assert len(text[: text.index("Training options")].splitlines()) < 150


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model_name_or_path", "no-such-org/no-such-model"], "HF_HUB_OFFLINE"),
        (["--dataset_name", "no-such-org/no-such-dataset"], "HF_HUB_OFFLINE"),
        (["--label_column_name", "fine_label"], "label"),
        (["--image_column_name", "picture"], "image"),
        (["--eval_split", "holdout"], "holdout"),
        (["--zsharp_percentile", "1.5"], "zsharp_percentile"),
        (["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
        (["--max_eval_samples", "-3"], "--max_eval_samples must be at least 1"),
        (["--image_size", "100000"], "--image_size must lie between 1 and 4096 pixels; got 100000"),
        (
            ["--image_size", "4096", "--per_device_train_batch_size", "100000"],
            "a batch of 100000 such images",
        ),
        (  # every batch dropped: Trainer would train nothing and report success
            [
                "--dataloader_drop_last",
                "true",
                "--per_device_train_batch_size",
                "64",
                "--max_train_samples",
                "16",
            ],
            "--dataloader_drop_last with a batch of 64 (64 per device x 1 process(es)) and 16 training examples: "
            "every batch would be dropped and nothing trained. Lower --per_device_train_batch_size to 16 or less",
        ),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train("--output_dir", tmp_path / "out", *FAST, *argv)
    assert message in str(exit_info.value) and str(exit_info.value).startswith("error: ")
    assert not (tmp_path / "out" / "model.safetensors").exists()


class StopBeforeTheModel(ValueError):
    """Raised in place of loading the model: what a test checks has happened by then, and nothing trained."""


def stop_before_the_model(*args, **kwargs):
    raise StopBeforeTheModel("stopped before the model")


@pytest.mark.parametrize(("warmup", "warned"), [("10", True), ("1", False)])
def test_a_run_shorter_than_its_warm_up_is_warned_of_before_training(
    tmp_path, monkeypatch, caplog, warmup, warned
):
    """The default recipe warms up over 10 steps: a 2-step run never trains at its learning rate, though the card
    states it with "warm-up 10 steps"."""
    monkeypatch.setattr("hf_zsharp.run.load_model", stop_before_the_model)
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.run"), pytest.raises(SystemExit, match="stopped"):
        train("--output_dir", tmp_path / "out", *FAST, "--warmup_steps", warmup)
    expected = (
        "The run takes 2 optimizer step(s) and warms up over 10 (--warmup_steps 10): its learning rate rises to "
        "0.0003, 10% of --learning_rate 0.003, and never reaches it. Lower --warmup_steps or train longer."
    )
    assert (expected in caplog.text) is warned


def test_a_missing_reporting_package_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    """Without the check, Trainer fails once built, after the data, advising an update of PyTorch."""
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr("hf_zsharp.run.load_image_dataset", stop_before_the_model)
    with pytest.raises(
        SystemExit, match=r"error: --report_to tensorboard: the tensorboard package is not inst"
    ):
        train("--output_dir", tmp_path / "out", *FAST, "--report_to", "tensorboard")


def test_invalid_sam_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit):
        train("--output_dir", tmp_path / "out", "--sam", "adam")


def test_an_output_dir_with_another_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds a run"):
        train("--output_dir", out, *FAST)
    assert (out / "notes.txt").read_text() == "mine" and (out / "trainer_state.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["outputs.py", "cifar_resnet.py", "training_curves.png", "zsharp_args.json"])
def test_a_file_of_the_users_that_the_run_would_overwrite_is_refused_and_kept(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine")
    with pytest.raises(SystemExit, match=f"would overwrite.*{name}"):
        train("--output_dir", out, *FAST)
    assert (out / name).read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [name]


def test_resume_from_checkpoint_last_resumes_the_last_checkpoint_and_says_which(tmp_path, caplog):
    out = tmp_path / "out"
    steps = ["--save_strategy", "steps", "--save_steps", "1", "--max_train_samples", "16"]
    with pytest.raises(SystemExit, match="holds no checkpoint-\\* folder"):
        train("--output_dir", out, *FAST, *steps, "--resume_from_checkpoint", "last")
    train("--output_dir", out, *FAST, *steps)  # checkpoints at steps 1 and 2
    with pytest.raises(SystemExit, match="resume its last checkpoint with --resume_from_checkpoint last"):
        train("--output_dir", out, *FAST, *steps)
    with caplog.at_level(logging.INFO, logger="hf_zsharp.run"):
        train("--output_dir", out, *FAST, *steps, "--max_steps", "3", "--resume_from_checkpoint", "true")
    assert f"Resuming training from the checkpoint {out / 'checkpoint-2'}." in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    # Resuming a finished run would train a step past its end (Trainer's loop): refused, the results kept.
    results = (out / "all_results.json").read_text()
    with pytest.raises(SystemExit, match="checkpoint-3'? is the end of a finished run \\(step 3 of 3\\)"):
        train("--output_dir", out, *FAST, *steps, "--max_steps", "3", "--resume_from_checkpoint", "last")
    assert (out / "all_results.json").read_text() == results and not (out / "checkpoint-4").exists()


def test_a_resume_with_other_sharpness_settings_or_method_is_refused_naming_them(tmp_path):
    """The checkpoint's optimizer keeps its own rho and percentile when loaded: a run stating 0.5 while its
    optimizer used 0.05 is refused, as is another --sam (which failed with a bare `error: 'percentile'`)."""
    out = tmp_path / "out"
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--max_train_samples", "16"]
    train("--output_dir", out, *FAST, *steps)
    again = ["--output_dir", out, *FAST, *steps, "--max_steps", "3", "--resume_from_checkpoint", "last"]
    with pytest.raises(
        SystemExit,
        match=r"error: .*sam_rho 0\.05 \(this run: 0\.5\), zsharp_percentile 0\.95 \(this run: 0\.5\)",
    ):
        train(*again, "--sam_rho", "0.5", "--zsharp_percentile", "0.5")
    with pytest.raises(
        SystemExit, match="error: Cannot load this optimizer state into SAM: it was saved by ZSharp"
    ):
        train(*again, "--sam", "sam")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2  # nothing trained


@pytest.mark.parametrize(
    ("where", "message"), [("file", "is a file"), ("under a file", "lies under .*, which is a file")]
)
def test_an_output_dir_that_is_or_lies_under_a_file_is_refused(tmp_path, where, message):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "out"
    with pytest.raises(SystemExit, match=f"error: Output directory .*{message}"):
        train("--output_dir", out, *FAST)
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write in: permissions for ordinary users, the immutable attribute for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = (
        os.geteuid() == 0
        and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    )
    try:
        if os.access(folder, os.W_OK) and not immutable:
            pytest.skip("cannot make a read-only folder on this machine")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_read_only_output_dir_is_refused_before_training(read_only_dir):
    with pytest.raises(SystemExit, match="error: Output directory .* cannot be written"):
        train("--output_dir", read_only_dir / "out", *FAST)


def test_checkpoint_rotation_never_deletes_checkpoints_this_run_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-5000").mkdir(parents=True)
    (out / "checkpoint-5000" / "model.safetensors").write_bytes(b"a user's weights")
    with pytest.raises(
        SystemExit, match="checkpoint-5000.*--save_total_limit 1 would let Trainer's checkpoint rotation"
    ):
        train("--output_dir", out, *FAST, "--overwrite_output_dir", "--save_total_limit", "1")
    assert (out / "checkpoint-5000" / "model.safetensors").read_bytes() == b"a user's weights"


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path):
    """torchrun on a CPU machine, without --use_cpu: one DDP group of two processes, ended cleanly."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "scripts" / "train.py"), "--output_dir", str(out), *[a for a in FAST if a != "--use_cpu"], *SMALL,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["epoch"] == 0.5  # 2 steps x 2 processes x 8 of 64 samples: both ranks trained
    assert (out / "README.md").is_file()
