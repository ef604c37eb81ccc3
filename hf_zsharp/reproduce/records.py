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
from collections.abc import Callable
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    """{name: number, bool or null}: a history row, or the sharpness columns (their settings aside)."""
    return isinstance(value, dict) and all(
        _number(v) or v is None or isinstance(v, bool) for k, v in value.items() if k != "settings"
    )


# What the tables read from a record: dotted field -> (check, what it must be).
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: isinstance(v, str), "a string") for key in ("dataset", "model", "method", "variant")},
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    **{
        f"metrics.{key}": (_number, "a number")
        for key in ("test_accuracy", "test_accuracy_at_best_val", "val_accuracy")
    },
    "history": (
        lambda v: isinstance(v, list) and all(_numbers(row) for row in v),
        "a list of {name: number}",
    ),
    "sharpness": (lambda v: v is None or _numbers(v), "null or {name: number}"),
    "timing.wall_time_s": (_number, "a number"),
    "timing.train_samples_per_second": (_number, "a number"),
    "code.source_sha256": (lambda v: isinstance(v, str), "a string"),
    "environment.device": (lambda v: isinstance(v, str), "a string"),
}
_MISSING = object()


def _field(record: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return _MISSING
        record = record[key]
    return record


def read_record(path: Path) -> dict[str, Any]:
    """A record file's content, checked for the fields the tables read; ValueError naming the file otherwise."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable run record ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a run record is a JSON object, found a {type(record).__name__}")
    for name, (check, what) in FIELDS.items():
        value = _field(record, name)
        if value is _MISSING or not check(value):
            found = "nothing" if value is _MISSING else repr(value)[:60]
            raise ValueError(f"{path}: field {name} must be {what}, found {found}")
    return record


def load_record(folder: Path) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished (no record); a record that cannot be
    read or lacks what the tables need raises ValueError naming the file."""
    path = folder / RECORD
    if not path.exists():
        return None
    return read_record(path)


def finished_records(root: str | Path) -> list[dict[str, Any]]:
    """Every record under `root`, at any depth, in path order; a bad one raises ValueError naming it."""
    return [read_record(path) for path in sorted(Path(root).rglob(RECORD))]


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
