"""Per-run records (`run.json`): writing them atomically, finding them, and the provenance they carry.

A record holds what re-creates and describes one run: the command, the code (git commit, whether the tree had
changes, a hash of the package's source), library versions, seed, every hyper-parameter, final metrics and the
per-epoch history. A folder with a `run.json` is a finished run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RECORD = "run.json"
RECORD_FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    """Write `folder/run.json`: from then on the run counts as finished."""
    path = folder / RECORD
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def load_record(folder: Path) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished (no or unreadable record)."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished_records(root: str | Path) -> list[dict[str, Any]]:
    """Every readable record under `root`, at any depth, in path order."""
    records = []
    for path in sorted(Path(root).rglob(RECORD)):
        record = load_record(path.parent)
        if record is not None:
            records.append(record)
    return records


def environment(threads: int) -> dict[str, str]:
    """Device, thread count and library versions, recorded with every run."""
    import accelerate
    import datasets
    import numpy
    import transformers

    import hf_zsharp

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "cpu": cpu_identity(),
        "threads": str(threads),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "hf_zsharp": hf_zsharp.__version__,
    }


def cpu_identity() -> str:
    """The CPU's model name and vector extensions: CPU kernels (oneDNN, MKL) pick their code paths by these, so
    bit-identical results can only be expected between runs on CPUs with the same identity."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    model = fields.get("model name") or platform.machine()  # the last processor's entries
    vector = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
    return f"{model} [{' '.join(vector)}]"


@functools.cache
def code_version() -> dict[str, Any]:
    """The git commit of the package's checkout, whether it had uncommitted changes, and a hash of its source.

    The hash (SHA-256 over the package's .py files, by relative path) identifies the code that ran even when the
    tree was dirty or is not a git checkout. Computed once per process: the code in memory does not change.
    """
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": _git_dirty(), "source_sha256": digest.hexdigest()}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return None if status is None else bool(status)
