"""What a run publishes: its model card, and with --push_to_hub one commit of the model folder to the Hub
(through an `HfApi` seam), at the end and, with --hub_strategy, in the background at each checkpoint.

Only what a user of the model needs is uploaded (weights, config, image processor, card, curves, settings and
metrics), and of those only the files the run itself wrote (its manifest, from `snapshot` / `written_since`):
optimizer states, `checkpoint-*` folders, `training_args.bin` and files that were already in the folder never
leave the machine. Before anything is sent, a push refuses a malformed manifest, a symbolic link whose target
lies outside the folder (the upload would send the target), and any uploaded file, weights included, that
holds a Hub token in use. Trainer's own push would upload every file of the folder, so the run keeps
push_to_hub off for the Trainer and publishes through `RunOutputs` and `PushOnSave`, as the Trainer does
otherwise: copying the model from the checkpoint, uploading with `HfApi.run_as_future`, skipping a push while
the previous one runs.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import validate_repo_id
from transformers import Trainer, TrainerCallback
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.trainer_utils import HubStrategy

from hf_zsharp import cards
from hf_zsharp.args import ResolvedRun
from hf_zsharp.keys import CARD_NAME, CURVES_NAME, MANIFEST_NAME, ZSHARP_ARGS_NAME

logger = logging.getLogger(__name__)

# What a model repo needs, by exact name; besides these, the weight shards named by the index and the model code
# named by the config's auto_map (`model_repo_files`).
MODEL_REPO_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "preprocessor_config.json",
    CARD_NAME,
    CURVES_NAME,
    ZSHARP_ARGS_NAME,
    "all_results.json",
    "train_results.json",
    "eval_results.json",
)
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_SUFFIX = ".safetensors"
_SCAN_CHUNK = 2**23  # bytes read at a time when a file is scanned for tokens

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


def model_repo_files(folder: str | Path) -> list[str]:
    """The names of the top-level files of `folder` that a model repo needs: MODEL_REPO_FILES, the weight shards
    of the safetensors index, and the model code files of the config's `auto_map` with their relative imports."""
    folder = Path(folder)
    names = {name for name in MODEL_REPO_FILES if (folder / name).is_file()}
    if INDEX_NAME in names:
        names.update(_weight_shards(folder / INDEX_NAME))
    if "config.json" in names:
        names.update(_auto_map_code(folder))
    return sorted(name for name in names if _is_plain_name(name) and (folder / name).is_file())


def _weight_shards(index: Path) -> set[str]:
    """The weight files the safetensors `index` maps weights to: only names of safetensors files named like
    the index (model*.safetensors), so that the index cannot add any other file of the folder to an upload."""
    weight_map = _json_object(index).get("weight_map") or {}
    if not isinstance(weight_map, dict):
        raise ValueError(f"cannot read {str(index)!r}: its weight_map is not an object")
    prefix = index.name.removesuffix(f"{WEIGHTS_SUFFIX}.index.json")
    return {
        name
        for name in weight_map.values()
        if isinstance(name, str) and name.startswith(prefix) and name.endswith(WEIGHTS_SUFFIX)
    }


def _auto_map_code(folder: Path) -> set[str]:
    """The model code files that the `auto_map` of the folder's config.json names (a reference "module.Class"
    is module.py; references to other repos, "repo--module.Class", are not files of the folder) and what they
    import relatively."""
    auto_map = _json_object(folder / "config.json").get("auto_map") or {}
    names = set()
    for references in auto_map.values() if isinstance(auto_map, dict) else ():
        for reference in references if isinstance(references, list) else [references]:
            code = folder / f"{str(reference).rsplit('.', 1)[0]}.py"
            if reference and "--" not in str(reference) and code.is_file():
                names.add(code.name)
                names.update(Path(path).name for path in get_relative_import_files(code))
    return names


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in a file of the model folder; a ValueError naming the file if it holds anything else."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {str(path)!r}: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"cannot read {str(path)!r}: it holds {type(content).__name__}, not a JSON object")
    return content


def _is_plain_name(name: str) -> bool:
    """Whether `name` names a file directly in a folder (no separator, not "." or "..")."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def write_manifest(folder: str | Path, names: Iterable[str]) -> Path:
    """Record in `folder` the files a run wrote there that a model repo needs (what `push_to_hub` uploads)."""
    path = Path(folder) / MANIFEST_NAME
    published = sorted(set(names) & set(model_repo_files(folder)))
    path.write_text(json.dumps({"files": published}, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> list[str] | None:
    """The file names the manifest of `folder` lists (`write_manifest`), None when it has none; a ValueError
    naming the manifest when it is not a file holding {"files": [file names]}, rather than a guess."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise ValueError(f"malformed manifest {str(path)!r}: not a file")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"malformed manifest {str(path)!r}: not JSON ({error})") from error
    files = content.get("files") if isinstance(content, dict) else None
    if not (
        isinstance(files, list) and all(isinstance(name, str) and _is_plain_name(name) for name in files)
    ):
        raise ValueError(
            f'malformed manifest {str(path)!r}: expected {{"files": [file names]}}, '
            f"got {json.dumps(content)[:100]}"
        )
    return files


def files_to_upload(output_dir: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """The files of `output_dir` a push uploads: those of `names` (or, when None, of the folder's manifest) that a
    model repo needs; in a folder without a manifest, every file a model repo needs (`model_repo_files`)."""
    output_dir = Path(output_dir)
    if names is None:
        names = read_manifest(output_dir)
    allowed = model_repo_files(output_dir)
    chosen = allowed if names is None else set(names) & set(allowed)
    return [output_dir / name for name in sorted(chosen)]


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

    `files` names what a run wrote (see `written_since`): those of them a model repo needs are uploaded; None
    uploads the folder's manifest (`read_manifest`), or without one every file a model repo needs, by name.
    Refuses (ValueError), before any call, a malformed manifest, an upload without safetensors weights,
    config.json or model card, a file linking out of the folder and any file that contains the Hub token.
    `api` replaces the `HfApi` client (tests pass a recording fake).
    """
    output_dir = Path(output_dir)
    validate_repo_id(repo_id)
    if not output_dir.is_dir():
        raise ValueError(f"cannot push {str(output_dir)!r}: it is not a directory")
    uploads = files_to_upload(output_dir, files)
    names = {path.name for path in uploads}
    if not any(name.endswith(WEIGHTS_SUFFIX) for name in names):
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
    return _upload(
        api,
        uploads,
        repo_id,
        output_dir,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
    )


def _upload(
    api: HfApi | None,
    files: list[Path],
    repo_id: str,
    folder: Path,
    *,
    token: str | None,
    private: bool | None,
    revision: str | None,
    **upload: Any,
) -> str:
    """Upload exactly `files` (of `folder`, at their paths in it) in one commit to `revision`, creating the
    repo (and the `revision` branch) if needed; returns the commit URL. Refuses first, before any call, a file
    that links out of `folder` or holds a token in use (`_refuse_unsafe`)."""
    api = api if api is not None else HfApi()
    _refuse_unsafe(files, folder, [token, getattr(api, "token", None), get_token()])
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        repo_type="model",
        revision=revision,
        allow_patterns=[glob.escape(path.relative_to(folder).as_posix()) for path in files],
        **upload,
    )
    return info.commit_url


def upload_advice(files: list[Path], repo_id: str, folder: str | Path, tokens: Iterable[str]) -> str:
    """How to push `files` later with the `hf` CLI; a file that must not be uploaded (`_unsafe`: a link out of
    the folder, a file holding one of `tokens`) is never named (it is said to be left out)."""
    secrets = list(tokens)
    kept = [path for path in files if _unsafe(path, Path(folder), secrets) is None]
    advice = f"Push them later with: hf upload {repo_id} {folder} " + " ".join(
        f"--include {path.name!r}" for path in kept
    )
    if len(kept) < len(files):
        advice += (
            f" ({len(files) - len(kept)} file(s) left out: a link out of the folder, or holding a Hub token; "
            "fix them first)"
        )
    return advice


def _unsafe(path: Path, folder: Path, tokens: list[str]) -> str | None:
    """Why uploading `path` from `folder` would leak something, or None: the upload sends what `path` resolves
    to, which must lie in `folder` and hold none of `tokens` (every file is read, whatever its name)."""
    outside = _link_out(path, folder)
    if outside is not None:
        return outside
    if _holds_token(path.resolve(), [token.encode() for token in tokens if token]):
        return (
            f"{path.relative_to(folder)} contains a Hub token in use; remove it from the file (the settings "
            "that hf_zsharp.cards.write_model_card() writes never hold one)"
        )
    return None


def _link_out(path: Path, folder: Path) -> str | None:
    """What is wrong when `path` (or a folder above it) is a symbolic link out of `folder`, whose target reading
    it would read; None when it resolves into `folder`."""
    target = path.resolve()
    if target.is_relative_to(folder.resolve()):
        return None
    return f"{path.relative_to(folder)} is a symbolic link to {target}, outside {folder}"


def _holds_token(path: Path, tokens: list[bytes]) -> bool:
    """Whether the file contains one of `tokens`, read in chunks (with an overlap, so that no token is split)
    to scan weights of any size without loading them whole."""
    if not tokens:
        return False
    overlap = max(map(len, tokens)) - 1
    tail = b""
    with path.open("rb") as stream:
        while chunk := stream.read(_SCAN_CHUNK):
            window = tail + chunk
            if any(token in window for token in tokens):
                return True
            tail = window[len(window) - overlap :]
    return False


def _refuse_unsafe(files: list[Path], folder: Path, secrets: list[object]) -> None:
    """Raise, naming the first such file, if one of `files` links out of `folder` or holds one of the Hub
    tokens in use (`secrets`): checked before anything is uploaded."""
    tokens = [secret for secret in secrets if isinstance(secret, str) and secret]
    for path in files:
        problem = _unsafe(path, folder, tokens)
        if problem is not None:
            raise ValueError(f"refusing to push: {problem}")


class RunOutputs:
    """What a run publishes: its model card (with curves) and, with --push_to_hub, the files it wrote.

    The files present in `output_dir` before training are recorded at construction: only those the run wrote
    (new or changed since) are ever pushed. Pushes during training run in the background (`HfApi.run_as_future`,
    one at a time, in order); `wait` returns when the last one has ended.
    """

    def __init__(
        self, trainer: Trainer, run: ResolvedRun, *, model_name: str, base_model: str | None
    ) -> None:
        """`trainer`: a `ZSharpMixin` trainer; the card states `run`'s settings (the user's arguments with the
        method's settings resolved)."""
        self.trainer, self.args, self.repo_id = trainer, trainer.args, run.push_to
        self.card = {
            "model_name": model_name,
            "finetuned_from": base_model,
            "dataset": run.data.dataset_name,
            "dataset_split": run.data.eval_split,
            "repo_id": run.push_to,
            "settings": {**cards.public_settings(run.training), **run.sam_settings},
        }
        self.before = snapshot(self.args.output_dir)
        self.api = HfApi() if self.repo_id is not None else None
        self.in_progress: Future | None = None

    def write_card(self, metrics: dict[str, Any]) -> None:
        """The model card, training curves and settings, for the model in `output_dir` and these metrics; then the
        manifest of the files the run wrote there (what `push_to_hub` on the folder uploads)."""
        self.trainer.create_model_card(metrics=metrics, **self.card)
        write_manifest(self.args.output_dir, written_since(self.args.output_dir, self.before))

    def push(self, message: str, checkpoint: Path | None = None) -> str:
        """One commit of the files this run wrote to `output_dir`, to --hub_revision; then `checkpoint`, when
        given, in its folder ("last-checkpoint" for --hub_strategy checkpoint, its own name for all_checkpoints)."""
        args = self.args
        files = written_since(args.output_dir, self.before)
        common = {"token": args.hub_token, "private": args.hub_private_repo, "revision": args.hub_revision}
        url = push_to_hub(
            args.output_dir, self.repo_id, files=files, commit_message=message, api=self.api, **common
        )
        if checkpoint is not None:
            # weights, optimizer, scheduler and RNG states, so that training can resume from it
            _upload(
                self.api,
                checkpoint_files(checkpoint),
                self.repo_id,
                checkpoint,
                commit_message=message,
                path_in_repo="last-checkpoint"
                if args.hub_strategy == HubStrategy.CHECKPOINT
                else checkpoint.name,
                **common,
            )
        return url

    def push_in_background(self, message: str, checkpoint: Path | None = None) -> None:
        """`push` on the `HfApi`'s background thread; training goes on meanwhile."""
        self.in_progress = self.api.run_as_future(self.push, message, checkpoint)
        self.in_progress.add_done_callback(_log_failed_push)

    def busy(self) -> bool:
        """Whether a background push is still running."""
        return self.in_progress is not None and not self.in_progress.done()

    def wait(self) -> None:
        """Return once the background push, if any, has ended (its failure is logged, not raised)."""
        if self.in_progress is not None:
            logger.info("Waiting for the push in progress to end.")
            self.in_progress.exception()

    def push_at_the_end(self) -> None:
        """The final push; a failure says that the local results are safe and how to push them later."""
        output_dir, repo_id = self.args.output_dir, self.repo_id
        try:
            url = self.push("Upload model trained with ZSharp")
        except Exception as error:
            files = files_to_upload(output_dir, written_since(output_dir, self.before))
            tokens = cards.tokens_in_use(self.args)
            raise RuntimeError(
                f"Training finished and its results are saved in {output_dir!r}, but pushing them to {repo_id!r} "
                f"failed: {error}. {upload_advice(files, repo_id, output_dir, tokens)}"
            ) from error
        logger.info("Pushed %s to %s", output_dir, url)


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The files of a Trainer checkpoint a push uploads: all (so that training can resume from it) but
    `training_args.bin`, the pickled arguments, which hold the Hub token."""
    return [
        path
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.relative_to(checkpoint).as_posix() != "training_args.bin"
    ]


def _log_failed_push(future: Future) -> None:
    if future.exception() is not None:
        logger.warning("A push during training failed (training goes on): %s", future.exception())


def copy_model_files(checkpoint: Path, output_dir: str | Path) -> None:
    """Copy the saved model of a Trainer checkpoint (weights, config, image processor) into `output_dir`, as
    Trainer does before a push, instead of saving the model again; a link out of the checkpoint is refused, as
    its copy would be pushed as a file of the run."""
    names = model_repo_files(checkpoint)
    for name in names:
        outside = _link_out(checkpoint / name, checkpoint)
        if outside is not None:
            raise ValueError(f"refusing to copy the checkpoint's model: {outside}")
    for name in names:
        shutil.copy(checkpoint / name, Path(output_dir) / name)


class PushOnSave(TrainerCallback):
    """--hub_strategy every_save / checkpoint / all_checkpoints: at every checkpoint, push the current model with
    its card and curves (and the checkpoint itself for the last two) in the background, as Trainer does: a save
    while the previous push still runs is not pushed (unless --hub_always_push). A failed push is logged, not
    fatal: the push at the end reports for good."""

    def __init__(self, outputs: RunOutputs) -> None:
        self.outputs = outputs

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.outputs.busy():
            if not args.hub_always_push:
                logger.info("Not pushing step %d: the previous push is still running.", state.global_step)
                return
            self.outputs.wait()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        copy_model_files(checkpoint, args.output_dir)
        evaluations = [entry for entry in state.log_history if "eval_loss" in entry]
        self.outputs.write_card(evaluations[-1] if evaluations else {})
        pushed = (
            checkpoint if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS) else None
        )
        self.outputs.push_in_background(f"Training in progress, step {state.global_step}", pushed)
