"""`python -m hf_zsharp train ...` / `python -m hf_zsharp reproduce ...`: the two console scripts as one module.

A module entry point lets launchers that take a module, such as `accelerate launch -m hf_zsharp train ...` and
`torchrun -m hf_zsharp train ...`, run the installed package without a clone of the repository.
"""

from __future__ import annotations

import difflib
import sys

USAGE = """usage: python -m hf_zsharp {train,reproduce} [ARGS ...]

commands:
  train      fine-tune or train an image classifier with ZSharp or a baseline (= hf-zsharp-train)
  reproduce  the paper's method comparison over seeds, with statistics (= hf-zsharp-reproduce)

`python -m hf_zsharp COMMAND --help` lists a command's options."""

COMMANDS = ("train", "reproduce")


def main(argv: list[str] | None = None) -> None:
    """Dispatch to `hf_zsharp.cli.train_main` or `reproduce_main` by the first argument."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        sys.exit(f"error: unknown command {command!r}{hint}; choose from {', '.join(COMMANDS)}")
    from hf_zsharp import cli  # imported after the check: a typo costs no torch/transformers import

    (cli.train_main if command == "train" else cli.reproduce_main)(rest)


if __name__ == "__main__":
    main()
