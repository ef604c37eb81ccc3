"""Regenerate RESULTS.md's tables and figures from the committed run records under results/ (one command).

    python scripts/make_results.py                        # rewrite the generated blocks of RESULTS.md
    python scripts/make_results.py --check                # exit 1 if RESULTS.md, CSV or figures differ; writes nothing
    python scripts/make_results.py --collect reproduce-digits   # first copy a grid's run.json files in
    python scripts/make_results.py --collect reproduce-calibration --into digits-calibration
    python scripts/make_results.py --collect reproduce-digits-long --into digits-long   # the second setting

Each generated block of RESULTS.md lies between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; the prose
around them is left alone. Figures and the CSV go to results/. A record that cannot be read, or lacks what the tables
need, stops the command with its file named.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.grid import without_output_dir
from hf_zsharp.reproduce.records import RECORD, read_record, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCUMENT = ROOT / "RESULTS.md"


def _identity(record: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    """What makes two records the same run wherever they ran: command, flags and hyper-parameters, less the
    output folder."""
    hyperparameters = {
        section: {k: v for k, v in values.items() if k not in ("output_dir", "logging_dir")}
        for section, values in (record.get("hyperparameters") or {}).items()
    }
    return record.get("command"), without_output_dir(record.get("argv") or []), hyperparameters


def _conflict(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How `new` is another run than `old` (None if it is the same run): command, flags or hyper-parameters."""
    (old_command, old_argv, old_hp), (new_command, new_argv, new_hp) = _identity(old), _identity(new)
    if (old_command, old_argv) != (new_command, new_argv):
        return f"command\n    {old_command}\n    {shlex.join(old_argv)}\n  against\n    {new_command}\n    {shlex.join(new_argv)}"
    changed = sorted(
        f"{section}.{key}"
        for section in old_hp.keys() & new_hp.keys()
        for key in old_hp[section].keys() & new_hp[section].keys()
        if old_hp[section][key] != new_hp[section][key]
    )
    return f"hyper-parameters {', '.join(changed)}" if changed else None


def collect(grid_dir: Path, records_dir: Path, replace: bool = False) -> int:
    """Copy every run.json under `grid_dir` to the same relative folder under `records_dir`; returns the count.

    Every record is read and checked first. One that would replace a committed record of another run (another
    command or other hyper-parameters) is refused, naming both, unless `replace`: then nothing is copied. A folder
    that does not exist or holds no record is an error, not zero records copied."""
    pairs = [
        (path, records_dir / path.parent.relative_to(grid_dir) / RECORD)
        for path in sorted(grid_dir.rglob(RECORD))
    ]
    if not pairs:
        what = "holds no " + RECORD if grid_dir.is_dir() else "is not a folder"
        raise ValueError(f"--collect {grid_dir} {what}: give the --output_dir of an hf-zsharp-reproduce run.")
    refused = []
    for source, target in pairs:
        new = read_record(source)
        if target.exists() and not replace and (why := _conflict(read_record(target), new)):
            refused.append(f"{source} would replace {target}, another run (differs in {why})")
    if refused:
        raise ValueError(
            "\n".join(refused) + "\nPass --replace to replace them, or collect --into another folder."
        )
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return len(pairs)


@contextmanager
def rendered() -> Iterator[tuple[str, Path]]:
    """RESULTS.md's text as the records give it, and a temporary folder holding its generated files; a document
    lacking a block, or holding an unknown one, stops it before anything is yielded."""
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(scratch)
        blocks = report.results_blocks(RESULTS, out_dir)
        yield report.update_blocks(DOCUMENT.read_text(encoding="utf-8"), blocks), out_dir


def check() -> list[str]:
    """What differs from what the records give (RESULTS.md, the CSVs, each figure): nothing under the repository
    is written."""
    with rendered() as (text, out_dir):
        stale = [] if text == DOCUMENT.read_text(encoding="utf-8") else [DOCUMENT.name]
        for made in sorted(out_dir.iterdir()):
            committed = RESULTS / made.name
            if not committed.exists() or committed.read_bytes() != made.read_bytes():
                stale.append(str(committed.relative_to(ROOT)))
    return stale


def write() -> None:
    """Put the generated files under results/ and the text in RESULTS.md."""
    with rendered() as (text, out_dir):
        for made in sorted(out_dir.iterdir()):
            write_atomic(RESULTS / made.name, made.read_bytes())
        write_atomic(DOCUMENT, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--collect", type=Path, help="a grid's output folder whose run.json files to copy in first"
    )
    parser.add_argument(
        "--into",
        default="digits",
        help="with --collect: the folder under results/ to copy into (default: digits; the second setting's runs "
        "go to digits-long, the loss-matched control's calibration runs to digits-calibration)",
    )
    parser.add_argument(
        "--replace", action="store_true", help="with --collect: replace committed records of other runs"
    )
    parser.add_argument(
        "--check", action="store_true", help="only check that RESULTS.md, CSV and figures are up to date"
    )
    args = parser.parse_args()
    if args.check and args.collect:
        parser.error("--check writes nothing: it cannot --collect")
    try:
        if args.check:
            stale = check()
            if stale:
                sys.exit(f"{', '.join(stale)} differ from what the records give: run scripts/make_results.py")
            return
        if args.collect:
            into = RESULTS / args.into
            print(
                f"Copied {collect(args.collect, into, args.replace)} records from {args.collect} into {into}."
            )
        write()
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(
        f"Rewrote the generated blocks of {DOCUMENT.name}; figures and CSV in {RESULTS.relative_to(ROOT)}/."
    )


if __name__ == "__main__":
    main()
