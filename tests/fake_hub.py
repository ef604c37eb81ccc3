"""A recording stand-in for `huggingface_hub.HfApi`: what would be created and uploaded, with no network."""

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub.utils import filter_repo_objects


class RecordingApi:
    """Stands in for HfApi: records calls and the bytes of every uploaded file; any other method fails.

    `whoami_error` is raised by `whoami` (an unreachable Hub, a rejected token); `upload_error` by the upload.
    `upload_gate`, when set to a `threading.Event`, holds every upload until it is set (a slow network;
    at most 30 s, then the upload fails).
    """

    def __init__(self, token=None, whoami_error=None, upload_error=None):
        self.token = token
        self.whoami_error = whoami_error
        self.upload_error = upload_error
        self.upload_gate = None
        self.calls = []
        self.uploaded = {}
        self._executor = ThreadPoolExecutor(
            max_workers=1
        )  # as HfApi: background jobs run one at a time, in order
        self.background_threads = set()

    def run_as_future(self, fn, *args, **kwargs):
        def job():
            self.background_threads.add(threading.get_ident())
            return fn(*args, **kwargs)

        return self._executor.submit(job)

    def whoami(self, token=None):
        self.calls.append(("whoami", token))
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(
        self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kwargs
    ):
        """As HfApi.upload_folder: every file under the folder (recursively) that the patterns let through."""
        if self.upload_gate is not None and not self.upload_gate.wait(timeout=30):
            raise TimeoutError("the upload was held for 30 s")
        if self.upload_error is not None:
            raise self.upload_error
        files = uploaded_files(folder_path, allow_patterns, ignore_patterns)
        prefix = f"{path_in_repo}/" if path_in_repo else ""
        self.uploaded.update({prefix + path: content for path, content in files.items()})
        self.calls.append(
            ("upload_folder", repo_id, {"path_in_repo": path_in_repo, "files": sorted(files), **kwargs})
        )
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


def uploaded_files(folder, allow_patterns=None, ignore_patterns=None) -> dict[str, bytes]:
    """The {path in repo: bytes} that HfApi.upload_folder would send with these patterns."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    return {path: (folder / path).read_bytes() for path in kept}
