"""Regenerate RESULTS.md's tables and figures from the committed run records under results/ (one command).

    python scripts/make_results.py                        # rewrite the generated blocks of RESULTS.md
    python scripts/make_results.py --check                # exit 1 if RESULTS.md is not what the records give
    python scripts/make_results.py --collect reproduce-digits   # first copy a grid's run.json files in

Each generated block of RESULTS.md lies between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; the prose
around them is left alone. Figures and the CSV go to results/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hf_zsharp.reproduce import report, tables
from hf_zsharp.reproduce.records import RECORD, finished_records, write_atomic
from hf_zsharp.reproduce.stats import summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCUMENT = ROOT / "RESULTS.md"


def collect(grid_dir: Path, records_dir: Path) -> int:
    """Copy every run.json under `grid_dir` to the same relative folder under `records_dir`; returns the count."""
    paths = sorted(grid_dir.rglob(RECORD))
    for path in paths:
        target = records_dir / path.parent.relative_to(grid_dir) / RECORD
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return len(paths)


def blocks(dataset: str) -> dict[str, str]:
    """Every generated block of RESULTS.md from the records of results/<dataset>; writes its CSV and figures."""
    try:
        generated = report.document_blocks(RESULTS / dataset, RESULTS, f"{dataset}-")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    write_atomic(RESULTS / f"{dataset}.csv", tables.table_csv(summarize(finished_records(RESULTS / dataset))))
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="digits", help="the records' folder under results/ (default: digits)"
    )
    parser.add_argument(
        "--collect", type=Path, help="a grid's output folder whose run.json files to copy in first"
    )
    parser.add_argument("--check", action="store_true", help="only check that RESULTS.md is up to date")
    args = parser.parse_args()
    if args.collect:
        print(f"Copied {collect(args.collect, RESULTS / args.dataset)} records from {args.collect}.")
    text = DOCUMENT.read_text(encoding="utf-8")
    new = report.update_blocks(text, blocks(args.dataset))
    if args.check:
        sys.exit(
            0 if new == text else "RESULTS.md differs from what the records give: run scripts/make_results.py"
        )
    write_atomic(DOCUMENT, new)
    print(
        f"Rewrote the generated blocks of {DOCUMENT.name}; figures and CSV in {RESULTS.relative_to(ROOT)}/."
    )


if __name__ == "__main__":
    main()
