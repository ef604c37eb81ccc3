"""`python scripts/reproduce.py` = `hf-zsharp-reproduce`: the paper's method comparison (see hf_zsharp.reproduce)."""

from hf_zsharp.cli import reproduce_main

if __name__ == "__main__":
    reproduce_main()
