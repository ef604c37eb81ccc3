"""Regenerate RESULTS.md's tables and figures from the committed run records under results/ (one command).

    python scripts/make_results.py                        # rewrite the generated blocks of RESULTS.md
    python scripts/make_results.py --check                # exit 1 if RESULTS.md, CSV or figures differ, or on stray files
    python scripts/make_results.py --collect reproduce-digits   # first copy a grid's run.json files in
    python scripts/make_results.py --collect reproduce-calibration --into digits-calibration
    python scripts/make_results.py --collect reproduce-digits-long --into digits-long   # the second setting

Each generated block of RESULTS.md lies between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; the prose
around them is left alone. Figures and the CSV go to results/.

Nothing is copied or written until everything is checked and rendered (into a temporary folder): a record that
cannot be read or lacks what the tables need (finite metrics included), a second record of one run, a record that
cannot share its table row (another preset, number of epochs or command), or a replacement of a committed record
of another run or with other metrics (without --replace) stops the command, naming the files. A collect says which
committed records it replaces and which of their fields differ. --check also names stray files under results/.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.grid import without_flags
from hf_zsharp.reproduce.records import RECORD, check_poolable, read_record, read_records, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCUMENT = ROOT / "RESULTS.md"

# Fields compared as a whole when saying how a record differs from the one it replaces: a re-run changes their
# entries together.
WHOLE = ("metrics", "history", "sharpness", "timing", "test_correct")
_ABSENT = object()


class Incoming(NamedTuple):
    """A record to collect: where it is, where it goes, its content and the committed record it replaces."""

    source: Path
    target: Path
    record: dict[str, Any]
    replaces: dict[str, Any] | None


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The record less what differs between two records of one run made in other folders or at other times: the
    output folder (in its flags and hyper-parameters) and when it finished."""
    hyperparameters = {
        section: {k: v for k, v in values.items() if k not in ("output_dir", "logging_dir")}
        for section, values in (record.get("hyperparameters") or {}).items()
    }
    kept = {k: v for k, v in record.items() if k != "finished_at"}
    return {
        **kept,
        "argv": without_flags(record.get("argv") or [], "--output_dir"),
        "hyperparameters": hyperparameters,
    }


def _differences(old: Any, new: Any, name: str = "") -> list[str]:
    """The dotted names of the fields in which `new` differs from `old` (a field of WHOLE named once)."""
    if isinstance(old, dict) and isinstance(new, dict) and name not in WHOLE:
        return [
            field
            for key in dict.fromkeys([*old, *new])
            for field in _differences(
                old.get(key, _ABSENT), new.get(key, _ABSENT), f"{name}.{key}" if name else key
            )
        ]
    return [] if old == new else [name]


def _another_run(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How `new` is another run than `old` (None if it is the same run): command, flags or hyper-parameters."""
    old, new = _comparable(old), _comparable(new)
    if old.get("command") != new.get("command"):
        return f"command `{old.get('command')}` against `{new.get('command')}`"
    if old["argv"] != new["argv"]:
        return f"flags `{shlex.join(old['argv'])}` against `{shlex.join(new['argv'])}`"
    changed = _differences(old["hyperparameters"], new["hyperparameters"], "hyperparameters")
    return f"hyper-parameters {', '.join(changed)}" if changed else None


def _refusal(item: Incoming) -> str | None:
    """Why `item` may replace its committed record only with --replace (another run, other metrics), or None."""
    if item.replaces is None:
        return None
    if why := _another_run(item.replaces, item.record):
        return f"{item.source} would replace {item.target}, another run ({why})"
    old, new = item.replaces["metrics"], item.record["metrics"]
    changed = [key for key in dict.fromkeys([*old, *new]) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]
    if changed:
        return f"{item.source} would replace {item.target}, whose metrics differ ({', '.join(changed)})"
    return None


def _incoming(grid_dir: Path, records_dir: Path) -> list[Incoming]:
    """Every run.json under `grid_dir`, read and checked, bound for the same relative folder under
    `records_dir`. A folder that does not exist or holds no record is an error, not zero records to copy."""
    sources = sorted(grid_dir.rglob(RECORD))
    if not sources:
        what = "holds no " + RECORD if grid_dir.is_dir() else "is not a folder"
        raise ValueError(f"--collect {grid_dir} {what}: give the --output_dir of an hf-zsharp-reproduce run.")
    incoming = []
    for source in sources:
        target = records_dir / source.parent.relative_to(grid_dir) / RECORD
        replaces = read_record(target) if target.exists() else None
        incoming.append(Incoming(source, target, read_record(source), replaces))
    return incoming


def plan_collect(grid_dir: Path, records_dir: Path, replace: bool = False) -> list[Incoming]:
    """The records to copy from `grid_dir` into `records_dir`, every one checked first: the folder's records
    after the copy must be poolable (each run once, one preset, length and command per table row); replacing a
    committed record of another run, or one with other metrics, takes `replace`."""
    incoming = _incoming(grid_dir, records_dir)
    replaced = {item.target for item in incoming}
    kept = {path: record for path, record in read_records(records_dir).items() if path not in replaced}
    check_poolable({**kept, **{item.source: item.record for item in incoming}})
    refused = [why for item in incoming if (why := _refusal(item))]
    if refused and not replace:
        raise ValueError(
            "\n".join(refused) + "\nPass --replace to replace them, or collect --into another folder."
        )
    return incoming


def _stage(incoming: Sequence[Incoming], folder: Path) -> Path:
    """A copy of results/'s records in `folder`, with `incoming` copied in: what the records will be. A bad
    committed record is named where it lies, not as its copy."""
    for path in RESULTS.rglob(RECORD):
        read_record(path)
        (folder / path.parent.relative_to(RESULTS)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.relative_to(RESULTS))
    for item in incoming:
        staged = folder / item.target.relative_to(RESULTS)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.source, staged)
    return folder


@contextmanager
def rendered(incoming: Sequence[Incoming] = ()) -> Iterator[tuple[str, Path]]:
    """RESULTS.md's text as the records give it (with `incoming` collected), and a temporary folder holding its
    generated files; a bad record, or a document lacking a block or holding an unknown one, stops it before
    anything is yielded."""
    with tempfile.TemporaryDirectory() as scratch:
        records_dir = _stage(incoming, Path(scratch, "records")) if incoming else RESULTS
        out_dir = Path(scratch, "made")
        out_dir.mkdir()
        blocks = report.results_blocks(records_dir, out_dir)
        yield report.update_blocks(DOCUMENT.read_text(encoding="utf-8"), blocks), out_dir


def _strays(made: set[str]) -> list[str]:
    """Files under results/ that are neither run records nor made by a setting's report (`made`: their names)."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in RESULTS.rglob("*")
        if path.is_file() and path.name != RECORD and not (path.parent == RESULTS and path.name in made)
    )


def check() -> list[str]:
    """What is wrong with results/ and RESULTS.md, a line per kind: files that differ from what the records give
    (RESULTS.md, the CSVs, each figure), and stray files. Nothing under the repository is written."""
    with rendered() as (text, out_dir):
        stale = [] if text == DOCUMENT.read_text(encoding="utf-8") else [DOCUMENT.name]
        for made in sorted(out_dir.iterdir()):
            committed = RESULTS / made.name
            if not committed.exists() or committed.read_bytes() != made.read_bytes():
                stale.append(str(committed.relative_to(ROOT)))
        strays = _strays({made.name for made in out_dir.iterdir()})
    problems = []
    if stale:
        problems.append(f"{', '.join(stale)} differ from what the records give: run scripts/make_results.py")
    if strays:
        problems.append(
            f"{', '.join(strays)} are neither run records nor made by a setting's report: remove them"
        )
    return problems


def write(incoming: Sequence[Incoming] = ()) -> None:
    """Copy `incoming` in, put the generated files under results/ and the text in RESULTS.md; all of it is
    rendered first, so that a failure writes nothing."""
    with rendered(incoming) as (text, out_dir):
        for item in incoming:
            write_atomic(item.target, item.source.read_bytes())
        for made in sorted(out_dir.iterdir()):
            write_atomic(RESULTS / made.name, made.read_bytes())
        write_atomic(DOCUMENT, text)


def _replaced(item: Incoming) -> str:
    """A line naming the committed record that `item` replaces and the fields in which they differ."""
    changed = _differences(_comparable(item.replaces or {}), _comparable(item.record))
    return f"  {item.target}: {', '.join(changed) or 'no field differs'}"


def collected(incoming: Sequence[Incoming], grid_dir: Path, records_dir: Path) -> str:
    """What a collect did: how many records it copied, and each committed record it replaced with the fields
    that differ."""
    replaced = [_replaced(item) for item in incoming if item.replaces is not None]
    done = f"Copied {len(incoming)} records from {grid_dir} into {records_dir}"
    if not replaced:
        return done + "."
    return f"{done}, replacing {len(replaced)} committed record(s):\n" + "\n".join(replaced)


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
        "--replace",
        action="store_true",
        help="with --collect: replace committed records of other runs, or with other metrics",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that RESULTS.md, CSV and figures are up to date and results/ holds no stray file",
    )
    args = parser.parse_args()
    if args.check and args.collect:
        parser.error("--check writes nothing: it cannot --collect")
    if args.into in ("", ".", "..") or Path(args.into).name != args.into:
        parser.error(f"--into {args.into}: give the name of a folder under results/, such as digits-long")
    try:
        if args.check:
            problems = check()
            if problems:
                sys.exit("\n".join(problems))
            return
        into = RESULTS / args.into
        incoming = plan_collect(args.collect, into, args.replace) if args.collect else []
        write(incoming)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.collect:
        print(collected(incoming, args.collect, into))
    print(
        f"Rewrote the generated blocks of {DOCUMENT.name}; figures and CSV in {RESULTS.relative_to(ROOT)}/."
    )


if __name__ == "__main__":
    main()
