"""push_to_hub through a recording fake HfApi: uploaded files, metadata, no token leak, refusals."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from fake_hub import RecordingApi
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from hf_zsharp.cards import write_model_card
from hf_zsharp.hub import (
    check_push_prerequisites,
    copy_model_files,
    push_to_hub,
    snapshot,
    upload_advice,
    write_manifest,
    written_since,
)

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
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
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
    index = {"weight_map": {"weight": "model-00001-of-00001.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, revision="zsharp-run", api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "upload_folder"]
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
    with pytest.raises(ValueError, match="README.md contains a Hub token"):
        push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN if source == "argument" else None, api=api)
    assert api.calls == []


def test_only_the_files_a_run_wrote_are_pushed(model_dir):
    # A user's files already in the folder before the run: never uploaded, even when they match a pattern.
    (model_dir / "customer_results.json").write_text('{"private": true}')
    (model_dir / "old_private_model.safetensors").write_bytes(b"private weights")
    before = snapshot(model_dir)
    (model_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75}))  # rewritten by the run
    (model_dir / "train_results.json").write_text("{}")  # new
    manifest = written_since(model_dir, before)
    assert manifest == ["all_results.json", "train_results.json"]
    model = ("model.safetensors", "config.json", "README.md")
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, files=[*manifest, *model], api=api)
    assert set(api.uploaded) == {*manifest, *model}
    assert api.uploaded["all_results.json"] == b'{"eval_accuracy": 0.75}'


def test_a_file_name_with_pattern_characters_is_uploaded_alone(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model[1].safetensors")
    (model_dir / "model1.safetensors").write_bytes(
        b"what the unescaped pattern 'model[1].safetensors' matches"
    )
    index = {"weight_map": {"weight": "model[1].safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, api=api)
    assert "model[1].safetensors" in api.uploaded and "model1.safetensors" not in api.uploaded


def test_push_prerequisites_are_checked_before_training(monkeypatch):
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        check_push_prerequisites(REPO_ID, FAKE_TOKEN, api=RecordingApi())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="needs a Hub token.*hf auth login"):
        check_push_prerequisites(REPO_ID, None, api=RecordingApi())
    with pytest.raises(ValueError, match="cannot be reached or refused the token.*Name or service"):
        check_push_prerequisites(
            REPO_ID, FAKE_TOKEN, api=RecordingApi(whoami_error=OSError("Name or service not known"))
        )
    with pytest.raises(ValueError, match="Repo id must"):
        check_push_prerequisites("not a repo id", FAKE_TOKEN, api=RecordingApi())
    api = RecordingApi()
    check_push_prerequisites(REPO_ID, FAKE_TOKEN, api=api)
    assert api.calls == [("whoami", FAKE_TOKEN)]


def test_a_folder_push_uploads_the_manifest_or_only_what_a_model_repo_needs(model_dir):
    """The user's own files in the folder never leave it: scripts, other results, other weights, a file with the
    token. Without a manifest only the model repo's files go, by name (the model code named by auto_map too)."""
    (model_dir / "my_script.py").write_text("print('mine')\n")
    (model_dir / "notes.py").write_text(f"TOKEN = '{FAKE_TOKEN}'\n")
    (model_dir / "customer_results.json").write_text('{"private": true}')
    (model_dir / "old.safetensors").write_bytes(b"private weights")
    (model_dir / "modeling_mine.py").write_text("from .layers import Block\n")
    (model_dir / "layers.py").write_text("Block = None\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyClassifier"}
    (model_dir / "config.json").write_text(json.dumps(config))
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN, api=api)
    assert set(api.uploaded) == EXPECTED | {"modeling_mine.py", "layers.py"}

    write_manifest(model_dir, ["model.safetensors", "config.json", "README.md", "notes.py", "layers.py"])
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN, api=api)
    assert set(api.uploaded) == {"model.safetensors", "config.json", "README.md", "layers.py"}

    (model_dir / "layers.py").write_text(f"Block = None  # {FAKE_TOKEN}\n")  # any uploaded text file is read
    with pytest.raises(ValueError, match="layers.py contains a Hub token"):
        push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN, api=RecordingApi())


def test_the_advice_after_a_failed_push_never_names_a_file_holding_the_token(model_dir):
    (model_dir / "zsharp_args.json").write_text(json.dumps({"run_name": f"run-{FAKE_TOKEN}"}))
    files = [model_dir / name for name in ("config.json", "zsharp_args.json", "model.safetensors")]
    advice = upload_advice(files, REPO_ID, model_dir, [FAKE_TOKEN])
    assert "--include 'config.json'" in advice and "--include 'model.safetensors'" in advice
    assert "zsharp_args.json" not in advice and "1 file(s) left out" in advice


# ------------------------------------------------------------------------------------------------
# What a folder push reads and sends: links, the index's weight map, the token scan, the manifest.


def test_a_link_out_of_the_folder_is_refused_naming_it_and_left_out_of_the_advice(model_dir, tmp_path):
    """A symbolic link uploads its target: one pointing out of the folder is refused before any call (one
    pointing to a file of the folder is uploaded with that file's content)."""
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"private": true}')
    (model_dir / "preprocessor_config.json").unlink()
    (model_dir / "preprocessor_config.json").symlink_to(outside)
    api = RecordingApi()
    with pytest.raises(
        ValueError, match=r"preprocessor_config\.json is a symbolic link to .*elsewhere\.json"
    ):
        push_to_hub(model_dir, REPO_ID, api=api)
    assert api.calls == []
    files = [model_dir / name for name in ("config.json", "preprocessor_config.json")]
    advice = upload_advice(files, REPO_ID, model_dir, [FAKE_TOKEN])
    assert "'config.json'" in advice and "preprocessor_config.json" not in advice
    assert "1 file(s) left out" in advice

    (model_dir / "preprocessor_config.json").unlink()
    (model_dir / "image_processor.json").write_text('{"size": 32}')
    (model_dir / "preprocessor_config.json").symlink_to("image_processor.json")  # inside: uploaded
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, api=api)
    assert (
        api.uploaded["preprocessor_config.json"] == b'{"size": 32}'
        and "image_processor.json" not in api.uploaded
    )


def test_a_checkpoint_file_linking_out_is_not_copied_into_the_pushed_folder(model_dir, tmp_path):
    checkpoint = model_dir / "checkpoint-10"
    for name in ("config.json", "README.md"):
        (checkpoint / name).write_text("{}")
    (tmp_path / "elsewhere.json").write_text('{"private": true}')
    (checkpoint / "preprocessor_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(
        ValueError, match=r"preprocessor_config\.json is a symbolic link to .*elsewhere\.json"
    ):
        copy_model_files(checkpoint, model_dir)
    assert (model_dir / "preprocessor_config.json").read_text() == "{}"


def test_the_index_adds_only_weight_shards_named_like_it(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    (model_dir / "notes.txt").write_text("private notes\n")
    (model_dir / "old.safetensors").write_bytes(b"private weights")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "notes.txt", "c": "old.safetensors", "d": 3}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    api = RecordingApi()
    push_to_hub(model_dir, REPO_ID, api=api)
    assert set(api.uploaded) == EXPECTED - {"model.safetensors"} | {
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    }


@pytest.mark.parametrize("weights", ["link", "metadata"])
def test_every_uploaded_file_is_scanned_for_the_token_whatever_its_name(model_dir, weights):
    """A `.safetensors` name exempts nothing: a link so named to a text file, or weights whose metadata holds
    the token, are refused like any file."""
    if weights == "link":
        (model_dir / "notes.txt").write_text(f"token: {FAKE_TOKEN}\n")
        (model_dir / "model-00002-of-00002.safetensors").symlink_to("notes.txt")
        (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
        shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
        name = "model-00002-of-00002.safetensors"
    else:
        weight = {"weight": np.zeros((2, 3), dtype=np.float32)}
        save_file(weight, str(model_dir / "model.safetensors"), metadata={"pushed_with": FAKE_TOKEN})
        name = "model.safetensors"
    api = RecordingApi()
    with pytest.raises(ValueError, match=f"{name} contains a Hub token"):
        push_to_hub(model_dir, REPO_ID, token=FAKE_TOKEN, api=api)
    assert api.calls == []


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ('{"files": "README.md"}', r"expected \{\"files\": \[file names\]\}"),
        ("null", r"expected \{\"files\": \[file names\]\}"),
        ('{"files": ["README.md", 3]}', r"expected \{\"files\": \[file names\]\}"),
        ('{"files": ["../README.md"]}', r"expected \{\"files\": \[file names\]\}"),
        ("{not json", "not JSON"),
        ("directory", "not a file"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_it_before_any_call(model_dir, manifest, problem):
    path = model_dir / "zsharp_manifest.json"
    if manifest == "directory":
        path.mkdir()
    else:
        path.write_text(manifest)
    api = RecordingApi()
    with pytest.raises(ValueError, match=f"malformed manifest '.*zsharp_manifest\\.json': {problem}"):
        push_to_hub(model_dir, REPO_ID, api=api)
    assert api.calls == []
