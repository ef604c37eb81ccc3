"""Push a ZSharp-trained model folder to the Hugging Face Hub in one commit, through an `HfApi` seam.

Only what a user of the model needs is uploaded (weights, config, image processor, card, curves, settings and
metrics), and of those only the files the run itself wrote (its manifest, from `snapshot` / `written_since`):
optimizer states, `checkpoint-*` folders, `training_args.bin` and files that were already in the folder never
leave the machine.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import validate_repo_id

from hf_zsharp.cards import CARD_NAME, CURVES_NAME, ZSHARP_ARGS_NAME

UPLOAD_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "preprocessor_config.json",
    "*.py",  # the model code of the paper architectures (see hf_zsharp.models), for trust_remote_code
    CARD_NAME,
    CURVES_NAME,
    ZSHARP_ARGS_NAME,
    "*results.json",
)
_TEXT_SUFFIXES = (".json", ".md")

FolderState = dict[str, tuple[int, int, int]]


def snapshot(folder: str | Path) -> FolderState:
    """The top-level files of `folder` with their (inode, size, mtime): taken before a run writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {
        path.name: (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        for path in folder.iterdir()
        if path.is_file() and (stat := path.stat())
    }


def written_since(folder: str | Path, before: FolderState) -> list[str]:
    """Names of the top-level files of `folder` that are new or changed since `before`: what a run wrote."""
    return sorted(name for name, state in snapshot(folder).items() if before.get(name) != state)


def files_to_upload(output_dir: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """The top-level files of `output_dir` that match UPLOAD_PATTERNS, limited to `names` when given.

    Sub-folders are never uploaded.
    """
    allowed = None if names is None else set(names)
    return sorted(
        path
        for path in Path(output_dir).iterdir()
        if path.is_file()
        and (allowed is None or path.name in allowed)
        and any(fnmatchcase(path.name, pattern) for pattern in UPLOAD_PATTERNS)
    )


def check_push_prerequisites(repo_id: str, token: str | None = None, api: HfApi | None = None) -> None:
    """Raise a ValueError now, before training, if a push at the end could not succeed.

    Checks the repo id, offline mode, that a token is available, and that the Hub accepts it (one `whoami`).
    """
    validate_repo_id(repo_id)
    if constants.is_offline_mode():
        raise ValueError(
            "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub."
        )
    token = token or getattr(api, "token", None) or get_token()
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    api = api if api is not None else HfApi()
    try:
        api.whoami(token=token)
    except Exception as error:  # network errors, HTTP 401, ...: all mean the push would fail after training
        raise ValueError(
            f"--push_to_hub: the Hub cannot be reached or refused the token ({error})."
        ) from error


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    files: Iterable[str] | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model trained with ZSharp",
    revision: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` if needed and upload the model folder in one commit; returns the commit URL.

    `files` is the run's manifest (names in `output_dir`, see `written_since`): only those of them that match
    UPLOAD_PATTERNS are uploaded; None uploads every matching file. Refuses (ValueError) an upload without
    safetensors weights, config.json or model card, and any text file that contains the Hub token. `api`
    replaces the `HfApi` client (tests pass a recording fake).
    """
    output_dir = Path(output_dir)
    validate_repo_id(repo_id)
    if not output_dir.is_dir():
        raise ValueError(f"cannot push {str(output_dir)!r}: it is not a directory")
    uploads = files_to_upload(output_dir, files)
    names = {path.name for path in uploads}
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
    _refuse_secrets(uploads, [token, getattr(api, "token", None), get_token()])

    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        allow_patterns=[glob.escape(name) for name in sorted(names)],
        commit_message=commit_message,
        token=token,
        repo_type="model",
        revision=revision,
    )
    return info.commit_url


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    path_in_repo: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload checkpoint",
    api: HfApi | None = None,
) -> str:
    """Upload a Trainer checkpoint folder (weights, optimizer and scheduler states, RNG states, trainer state) to
    `path_in_repo` in one commit, so that training can resume from the Hub; `training_args.bin` stays local."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"cannot push checkpoint {str(checkpoint)!r}: it is not a directory")
    api = api if api is not None else HfApi()
    files = [path for path in checkpoint.rglob("*") if path.is_file()]
    _refuse_secrets(files, [token, getattr(api, "token", None), get_token()])
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=checkpoint,
        path_in_repo=path_in_repo,
        ignore_patterns=["training_args.bin"],
        commit_message=commit_message,
        token=token,
        repo_type="model",
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
