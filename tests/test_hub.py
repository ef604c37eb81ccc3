"""push_to_hub through a recording fake HfApi: uploaded files, metadata, no token leak, refusals."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from hf_zsharp.cards import write_model_card
from hf_zsharp.hub import push_to_hub

FAKE_TOKEN = "hf_SECRETtoken123"
REPO_ID = "someone/resnet20-zsharp"
SETTINGS = {"sam": "zsharp", "sam_rho": 0.05, "zsharp_percentile": 0.95, "hub_token": FAKE_TOKEN}
EXPECTED = {
    "README.md",
    "all_results.json",
    "config.json",
    "eval_results.json",
    "model.safetensors",
    "preprocessor_config.json",
    "training_curves.png",
    "zsharp_args.json",
}


class RecordingApi:
    """Stands in for HfApi: records calls and the bytes of every uploaded file; any other method fails."""

    def __init__(self, token=None):
        self.token = token
        self.calls = []
        self.uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            assert op.path_in_repo not in self.uploaded
            self.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        self.calls.append(("create_commit", repo_id, kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/hf_token")


@pytest.fixture
def model_dir(tmp_path):
    """A finished training run: model files, Trainer leftovers that must stay local, and the card."""
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"weight": np.zeros((2, 3), dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    (folder / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    (folder / "trainer_state.json").write_text("{}")
    for leftover in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / leftover).write_bytes(b"local only")
    checkpoint = folder / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"old weights")
    (checkpoint / "optimizer.pt").write_bytes(b"state")
    write_model_card(
        folder,
        settings=SETTINGS,
        metrics={"eval_accuracy": 0.5},
        log_history=[{"loss": 1.0, "epoch": 1.0}, {"eval_accuracy": 0.5, "epoch": 1.0}],
        dataset_name="uoft-cs/cifar10",
        repo_id=REPO_ID,
    )
    return folder


def test_push_uploads_exactly_the_model_files_in_one_commit(model_dir):
    api = RecordingApi()
    url = push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN, private=True, api=api)

    assert url == f"https://huggingface.co/{REPO_ID}/commit/abc123"
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    _, repo_id, repo_kwargs = api.calls[0]
    assert repo_id == REPO_ID
    assert repo_kwargs["exist_ok"] is True and repo_kwargs["private"] is True
    assert repo_kwargs["token"] == FAKE_TOKEN
    assert api.calls[1][2]["revision"] is None and api.calls[1][2]["commit_message"]
    assert set(api.uploaded) == EXPECTED
    for name, content in api.uploaded.items():
        assert FAKE_TOKEN.encode() not in content, f"token leaked into {name}"
    assert api.uploaded["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()

    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert "zsharp" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(0.5)
    assert json.loads(api.uploaded["zsharp_args.json"]) == {
        "sam": "zsharp",
        "sam_rho": 0.05,
        "zsharp_percentile": 0.95,
    }


def test_push_to_revision_with_sharded_weights(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, revision="zsharp-run", api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[1][2]["branch"] == "zsharp-run" and api.calls[1][2]["exist_ok"] is True
    assert api.calls[2][2]["revision"] == "zsharp-run"
    expected = EXPECTED - {"model.safetensors"} | {
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    }
    assert set(api.uploaded) == expected


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model.safetensors", r"no \*\.safetensors weights \(other weight files: pytorch_model\.bin\)"),
        ("README.md", "no README.md; write it with hf_zsharp.cards.write_model_card"),
        ("config.json", "no config.json"),
    ],
)
def test_incomplete_folder_is_refused_before_any_call(model_dir, remove, message):
    (model_dir / "pytorch_model.bin").write_bytes(b"torch weights")
    (model_dir / remove).unlink()
    api = RecordingApi()
    with pytest.raises(ValueError, match=message):
        push_to_hub(model_dir, REPO_ID, api=api)
    assert api.calls == []


def test_bad_target_is_refused(model_dir, tmp_path):
    api = RecordingApi()
    with pytest.raises(ValueError, match="not a directory"):
        push_to_hub(tmp_path / "missing", REPO_ID, api=api)
    with pytest.raises(ValueError, match="Repo id must"):
        push_to_hub(model_dir, "not a repo id", api=api)
    assert api.calls == []


@pytest.mark.parametrize("source", ["argument", "api", "environment"])
def test_a_file_holding_the_token_is_never_uploaded(model_dir, monkeypatch, source):
    readme = model_dir / "README.md"
    readme.write_text(readme.read_text() + f"\nhub_token: {FAKE_TOKEN}\n")
    api = RecordingApi(token=FAKE_TOKEN if source == "api" else None)
    if source == "environment":
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(ValueError, match="README.md contains the Hub token"):
        push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN if source == "argument" else None, api=api)
    assert api.calls == []
