"""The README's code blocks, for the tests that execute them: every block a user may copy runs in a test."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(heading: str, language: str = "python") -> list[str]:
    """The ```<language> blocks under `heading` (a whole heading line, e.g. "## With timm"), in order, up to the
    next heading (of any level: a subsection's blocks are its own)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(r"#+ ", lines[i]) and not _inside_block(lines, i)),
        len(lines),
    )
    section = "\n".join(lines[start:end])
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)


def _inside_block(lines: list[str], index: int) -> bool:
    return sum(line.startswith("```") for line in lines[:index]) % 2 == 1
