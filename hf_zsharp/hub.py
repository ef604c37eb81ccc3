"""Push a ZSharp-trained model folder to the Hugging Face Hub in one commit, through an `HfApi` seam.

Only what a user of the model needs is uploaded (weights, config, image processor, card, curves, settings and
metrics); optimizer states, `checkpoint-*` folders and `training_args.bin` never leave the machine.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import validate_repo_id

from hf_zsharp.cards import CARD_NAME, CURVES_NAME, ZSHARP_ARGS_NAME

UPLOAD_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "preprocessor_config.json",
    CARD_NAME,
    CURVES_NAME,
    ZSHARP_ARGS_NAME,
    "*results.json",
)
_TEXT_SUFFIXES = (".json", ".md")


def files_to_upload(output_dir: str | Path) -> list[Path]:
    """The top-level files of `output_dir` that match UPLOAD_PATTERNS (sub-folders are never uploaded)."""
    return sorted(
        path
        for path in Path(output_dir).iterdir()
        if path.is_file() and any(fnmatchcase(path.name, pattern) for pattern in UPLOAD_PATTERNS)
    )


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model trained with ZSharp",
    revision: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` if needed and upload the model folder in one commit; returns the commit URL.

    Refuses (ValueError) a folder without safetensors weights, config.json or model card, and any text file
    that contains the Hub token. `api` replaces the `HfApi` client (tests pass a recording fake).
    """
    output_dir = Path(output_dir)
    validate_repo_id(repo_id)
    if not output_dir.is_dir():
        raise ValueError(f"cannot push {str(output_dir)!r}: it is not a directory")
    files = files_to_upload(output_dir)
    names = {path.name for path in files}
    if not any(name.endswith(".safetensors") for name in names):
        found = ", ".join(sorted(p.name for p in output_dir.glob("pytorch_model*.bin"))) or "none"
        raise ValueError(
            f"cannot push {str(output_dir)!r}: it holds no *.safetensors weights (other weight files: {found}); "
            "save the model with save_pretrained(), whose default format is safetensors"
        )
    for required, hint in (
        ("config.json", "save_pretrained()"),
        (CARD_NAME, "hf_zsharp.cards.write_model_card()"),
    ):
        if required not in names:
            raise ValueError(
                f"cannot push {str(output_dir)!r}: it has no {required}; write it with {hint} first"
            )
    api = api if api is not None else HfApi()
    _refuse_secrets(files, [token, getattr(api, "token", None), get_token()])

    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    info = api.create_commit(
        repo_id, operations, commit_message=commit_message, token=token, repo_type="model", revision=revision
    )
    return info.commit_url


def _refuse_secrets(files: list[Path], secrets: list[object]) -> None:
    """Raise before uploading if a card, settings or metrics file contains one of the Hub tokens in use."""
    tokens = [secret.encode() for secret in secrets if isinstance(secret, str) and secret]
    for path in files:
        if path.suffix in _TEXT_SUFFIXES and any(token in path.read_bytes() for token in tokens):
            raise ValueError(
                f"refusing to push: {path.name} contains the Hub token; rewrite it with "
                "hf_zsharp.cards.write_model_card(), which removes tokens from the settings"
            )
