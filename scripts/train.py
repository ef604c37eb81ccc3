"""Fine-tune an image classifier with ZSharp: `python scripts/train.py --help` (same as `hf-zsharp-train`)."""

from hf_zsharp.cli import train_main

if __name__ == "__main__":
    train_main()
