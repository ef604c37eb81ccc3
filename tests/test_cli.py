"""`hf-zsharp-train` end to end: generated datasets with the Hub schemas, tiny local models, the fake Hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_zsharp import hub
from hf_zsharp.cli import DEFAULT_TRAIN_ARGS, train_main

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


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls and the uploaded files' contents."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        self.token = kwargs.get("token")

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        RecordingApi.calls.append(("create_commit", repo_id, files))
        return type("Info", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_model_and_card_without_the_token(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    out = tmp_path / "out"
    train(
        *DEFAULT_TRAIN_ARGS, "--output_dir", out, *FAST, "--max_train_samples", "64", "--max_eval_samples", "32",
        "--push_to_hub", "--hub_model_id", "someone/zsharp-digits", "--hub_token", TOKEN,
    )  # fmt: skip
    (kind, repo, _), (commit, repo2, files) = RecordingApi.calls
    assert (kind, commit, repo, repo2) == ("create_repo", "create_commit", "someone/zsharp-digits", repo)
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "training_curves.png",
        "zsharp_args.json",
    } <= set(files)
    assert not any(name.endswith((".bin", ".pt")) or "checkpoint" in name for name in files)
    assert all(TOKEN.encode() not in content for content in files.values())
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert TOKEN not in path.read_text(errors="ignore"), path
    assert "someone/zsharp-digits" in files["README.md"].decode()


def test_embedded_default_runs_with_no_arguments(tmp_path, monkeypatch):
    """`hf-zsharp-train` alone: the default writes to ./outputs (shortened here through the same flags)."""
    monkeypatch.chdir(tmp_path)
    short = [*DEFAULT_TRAIN_ARGS, "--max_steps", "3", "--max_eval_samples", "50"]
    monkeypatch.setattr("hf_zsharp.cli.DEFAULT_TRAIN_ARGS", short)
    train_main([])
    card = ModelCard.load(tmp_path / "outputs" / "README.md")
    assert card.data.eval_results[0].metric_type == "accuracy"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model_name_or_path", "no-such-org/no-such-model"], "HF_HUB_OFFLINE"),
        (["--dataset_name", "no-such-org/no-such-dataset"], "HF_HUB_OFFLINE"),
        (["--label_column_name", "fine_label"], "label"),
        (["--image_column_name", "picture"], "image"),
        (["--eval_split", "holdout"], "holdout"),
        (["--zsharp_percentile", "1.5"], "zsharp_percentile"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(*DEFAULT_TRAIN_ARGS, "--output_dir", tmp_path / "out", *FAST, *argv)
    assert message in str(exit_info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_invalid_sam_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit):
        train(*DEFAULT_TRAIN_ARGS, "--output_dir", tmp_path / "out", "--sam", "adam")


def test_an_output_dir_with_another_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    argv = [a for a in DEFAULT_TRAIN_ARGS if a != "--overwrite_output_dir"]
    with pytest.raises(SystemExit, match="already holds a run"):
        train(*argv, "--output_dir", out, *FAST)
    assert (out / "notes.txt").read_text() == "mine" and (out / "trainer_state.json").read_text() == "{}"


def test_two_processes_with_torchrun(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "scripts" / "train.py"),
        *DEFAULT_TRAIN_ARGS, "--output_dir", str(out), *FAST, "--max_train_samples", "64", "--max_eval_samples", "32",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["epoch"] == 0.5  # 2 steps x 2 processes x 8 of 64 samples: both ranks trained
    assert (out / "README.md").is_file()
