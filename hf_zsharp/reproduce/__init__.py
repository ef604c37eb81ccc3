"""`hf-zsharp-reproduce`: the paper's optimizer comparison as one resumable command, with seeds and statistics.

A grid of methods x rho x percentile x models x datasets x seeds runs one run after another through
`hf_zsharp.run.run_training` (the code behind `hf-zsharp-train`). Each run lives in
`<output_dir>/<dataset>/<model>/<variant>/seed-<n>` and ends by writing its record, `run.json`, atomically; a
folder with a record is a finished run and is not repeated. After every run the results tables and figures are
rewritten from all records under `output_dir`.

Modules: `presets` (methods, grids, shared flags), `recipe` (the paper's Adam and LR schedule), `grid` (runs and
the resolved plan), `runner` (one run: train, test, measure, record), `records` (record files and provenance),
`stats` (intervals, paired tests, Holm), `tables`, `figures`, `report` (results files and RESULTS.md blocks),
`mask_overlap` (the Z-score vs magnitude mask overlap logged in training), `lock` (per-run locks), `args`
(`ReproduceArguments`, the options) and `cli` (the command line).
"""

from hf_zsharp.reproduce.cli import main

__all__ = ["main"]
