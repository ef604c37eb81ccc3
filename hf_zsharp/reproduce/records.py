"""Per-run records (`run.json`): writing them atomically, finding them, and the provenance they carry.

A record holds what re-creates and describes one run: the command, the code (git commit, whether the tree had
changes, a hash of the package's source), library versions, seed, every hyper-parameter, final metrics and the
per-epoch history. A folder with a `run.json` is a finished run. Records pooled into one table row (one dataset,
model and method variant) must be runs of one preset, length and command, each seed once (`check_poolable`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from hf_zsharp.reproduce.grid import short_name, without_flags

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


def _finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite: what a mean, an interval and a plot can take."""
    return _number(value) and math.isfinite(value)


def _numbers(value: Any) -> bool:
    """{name: number, bool or null}: a history row, or the sharpness columns (their settings and the worst case at
    the extra radii, a {radius: number} of its own, aside)."""
    return isinstance(value, dict) and all(
        _number(v) or v is None or isinstance(v, bool)
        for k, v in value.items()
        if k not in ("settings", "sharpness_at")
    )


# What the tables read from a record: dotted field -> (check, what it must be).
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: isinstance(v, str), "a string") for key in ("dataset", "model", "method", "variant")},
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    **{
        f"metrics.{key}": (_finite, "a finite number")
        for key in ("test_accuracy", "test_accuracy_at_best_val", "val_accuracy")
    },
    "history": (
        lambda v: isinstance(v, list) and all(_numbers(row) for row in v),
        "a list of {name: number}",
    ),
    "sharpness": (
        lambda v: v is None or (_numbers(v) and _numbers(v.get("sharpness_at", {}))),
        "null or {name: number} (sharpness_at: {radius: number})",
    ),
    "timing.wall_time_s": (_finite, "a finite number"),
    "timing.train_samples_per_second": (_finite, "a finite number"),
    "code.commit": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "code.dirty": (lambda v: v is None or isinstance(v, bool), "null or a boolean"),
    "code.source_sha256": (lambda v: isinstance(v, str), "a string"),
    "environment": (lambda v: isinstance(v, dict), "an object"),
    "environment.device": (lambda v: isinstance(v, str), "a string"),
    "environment.threads": (lambda v: isinstance(v, str), "a string"),
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
    for key, value in record["metrics"].items():  # the other metrics: a diverged run shows in any of them
        if value is not None and not _finite(value):
            raise ValueError(f"{path}: field metrics.{key} must be a finite number or null, found {value!r}")
    return record


def load_record(folder: Path) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished (no record); a record that cannot be
    read or lacks what the tables need raises ValueError naming the file."""
    path = folder / RECORD
    if not path.exists():
        return None
    return read_record(path)


def read_records(root: str | Path) -> dict[Path, dict[str, Any]]:
    """Every record under `root`, at any depth, by path in path order; a bad one raises ValueError naming it."""
    return {path: read_record(path) for path in sorted(Path(root).rglob(RECORD))}


def finished_records(root: str | Path) -> list[dict[str, Any]]:
    """Every record under `root`, at any depth, in path order: what one report pools. A bad record, or records
    that must not share a table row (`check_poolable`), raise ValueError naming them."""
    records = read_records(root)
    check_poolable(records)
    return list(records.values())


def _epochs(argv: list[str]) -> str | None:
    """The run's `--num_train_epochs` (the last one: later flags win) as `4`, None if its flags do not set it."""
    values = [argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag == "--num_train_epochs"]
    return f"{float(values[-1]):g}" if values else None


def recipe(record: Mapping[str, Any]) -> dict[str, str | None]:
    """What every run of one table row must share, as recorded: the preset, the number of epochs, the command
    and the training flags, both less the seed and the output folder (None where the record lacks them)."""
    words = shlex.split(record.get("command") or "")
    argv = list(record.get("argv") or [])
    return {
        "preset": words[1] if len(words) > 1 else None,
        "epochs": _epochs(argv),
        "command": shlex.join(without_flags(words, "--seeds")),
        "flags": shlex.join(without_flags(argv, "--seed", "--output_dir")),
    }


def _recipe_difference(mine: Mapping[str, str | None], theirs: Mapping[str, str | None]) -> str | None:
    """How recipe `mine` differs from `theirs`, most telling first (preset and epochs; else the command; else the
    flags), or None if it does not."""
    for keys in (("preset", "epochs"), ("command",), ("flags",)):
        shown = [f"{key} {mine[key]}, not {theirs[key]}" for key in keys if mine[key] != theirs[key]]
        if shown:
            return "; ".join(shown)
    return None


def check_poolable(records: Mapping[Any, Mapping[str, Any]]) -> None:
    """Refuse records that one report must not pool, naming them by their keys (paths, or labels): a second
    record of a (dataset, model, variant, seed), or a record whose preset, epochs or command differ from those of
    the first record of its table row (dataset, model, variant). A row's mean is the mean of one run's seeds only
    if its records are that."""
    runs: dict[tuple, Any] = {}
    rows: dict[tuple, tuple[Any, dict[str, str | None]]] = {}
    for name, record in records.items():
        row = (short_name(record["dataset"]), short_name(record["model"]), record["variant"])
        where = f"{row[0]}/{row[1]} {row[2]}"
        run = (*row, record["seed"])
        if run in runs:
            raise ValueError(
                f"{name} is a second record of {where} seed {record['seed']} (the first: {runs[run]})"
            )
        runs[run] = name
        first, first_recipe = rows.setdefault(row, (name, recipe(record)))
        if (difference := _recipe_difference(recipe(record), first_recipe)) is not None:
            raise ValueError(f"{name} cannot be pooled with {first} ({where}): {difference}")


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
