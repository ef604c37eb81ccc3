"""Results from records: the grid's own results.md / .csv / figures, and the generated blocks of RESULTS.md.

Generated blocks sit between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` in a Markdown file;
`update_blocks` rewrites what lies between and leaves the prose around them alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_zsharp.reproduce import figures, tables
from hf_zsharp.reproduce.cost import preset_cost_table
from hf_zsharp.reproduce.grid import short_name
from hf_zsharp.reproduce.presets import LOSS_MATCHED, LOSS_MATCHED_LONG, TUNED_RHO, VARIANTS
from hf_zsharp.reproduce.records import finished_records, write_atomic
from hf_zsharp.reproduce.stats import FAMILIES, contrasts, rank_correlation, summarize, sweeps

Record = Mapping[str, Any]


def _p_words(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def by_dataset_model(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records grouped by (dataset, model) short names, in first-seen order."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        groups.setdefault((short_name(record["dataset"]), short_name(record["model"])), []).append(record)
    return groups


def provenance(records: Sequence[Record]) -> str:
    """Where and with what the runs ran: count, total time, code (with runs per source), versions, device."""
    sources = Counter(
        (r["code"]["commit"] or "unknown", bool(r["code"]["dirty"]), r["code"]["source_sha256"][:12])
        for r in records
    )
    ignored = ("device", "cpu", "threads", "platform")
    versions = sorted(
        {", ".join(f"{k} {v}" for k, v in r["environment"].items() if k not in ignored) for r in records}
    )
    devices = sorted(
        {
            f"{r['environment'].get('cpu') or r['environment']['device']}, {r['environment']['threads']} thread(s)"
            for r in records
        }
    )
    hours = sum(r["timing"].get("total_s", r["timing"]["wall_time_s"]) for r in records) / 3600
    code = "; ".join(
        f"commit {commit[:10]}{' with uncommitted changes' if dirty else ''}, source hash {digest} ({n} runs)"
        for (commit, dirty, digest), n in sorted(sources.items())
    )
    lines = [
        f"- {len(records)} runs, {hours:.1f} h in all (training, test and sharpness; process start-up not counted).",
        f"- Code: {code}.",
        "- Versions: " + "; ".join(versions) + ".",
        "- Device: " + "; ".join(devices) + ".",
    ]
    return "\n".join(lines) + "\n"


def family_contrasts(records: Sequence[Record]) -> dict[str, list[dict[str, Any]]]:
    """Each declared family's contrasts (`stats.contrasts`) for records of one dataset and model, computed once for
    both the tables and the contrasts CSV (each holds a 2,000-resample bootstrap)."""
    return {family: contrasts(records, family) for family in FAMILIES}


def sections(
    records: Sequence[Record],
    figure_dir: Path,
    figure_prefix: str = "",
    link_dir: str = "",
    setting: str = "",
    families: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, str]:
    """The generated blocks for records of one dataset and model: tables, figure links, provenance. Figures are
    drawn into `figure_dir` and linked as `link_dir` + file name (the folder as seen from the document); their
    titles name the `setting` when given. `families`: the records' `family_contrasts`, when the caller has them."""
    rows = summarize(records)
    (dataset, model), *others = by_dataset_model(records)
    if others:
        raise ValueError("sections() takes the records of one dataset and model")
    if families is None:
        families = family_contrasts(records)
    title = f"{dataset} / {model}" + (f" ({setting})" if setting else "")
    blocks = {
        "provenance": provenance(records),
        "accuracy": tables.accuracy_table(rows),
        "sharpness": tables.sharpness_table(rows),
        "paper-claim": tables.contrast_table(families["paper"]),
        "mechanism": tables.contrast_table(families["mechanism"]),
        "cost": tables.cost_table(rows),
    }
    if families["tuned"]:  # the radii tuned on validation ran in this setting
        blocks["tuned"] = tables.contrast_table(families["tuned"])
    if any(row["default"] for row in rows):
        methods_png = figures.plot_methods(rows, records, title, figure_dir / f"{figure_prefix}methods.png")
        blocks["figure-methods"] = f"![{title}: methods]({link_dir}{methods_png.name})\n"
    if figures.loss_at_w_runs(records):  # a sweep alone (no run at default settings) has no such figure
        loss_png = figures.plot_loss_at_w(records, title, figure_dir / f"{figure_prefix}loss-at-w.png")
        blocks["figure-loss-at-w"] = f"![{title}: sharpness against loss at w]({link_dir}{loss_png.name})\n"
        correlation = rank_correlation(records, "loss_at_w", "sharpness")
        if correlation is not None:
            r, p, n = correlation
            within, p_within, _ = rank_correlation(records, "loss_at_w", "sharpness", within_methods=True)
            blocks["figure-loss-at-w"] += (
                f"\nSpearman's rank correlation of loss at w and worst-case increase over the {n} runs at default "
                f"settings, all methods pooled: {r:+.2f} ({_p_words(p)}); within methods (each run's values centred "
                f"on its method's means): {within:+.2f} ({_p_words(p_within)}).\n"
            )
    for axis, swept in sweeps(records).items():
        sweep_rows = summarize(swept)
        blocks[f"sweep-{axis}"] = tables.sweep_table(sweep_rows, axis)
        if axis == "rho":
            methods = list(dict.fromkeys(r["method"] for r in sweep_rows))
            sweep_png = figures.plot_sweep(
                sweep_rows, methods, title, figure_dir / f"{figure_prefix}sweep.png"
            )
            blocks["figure-sweep"] = f"![{title}: ρ sweep]({link_dir}{sweep_png.name})\n"
    return blocks


# The settings RESULTS.md reports: a records folder under results/ and the prefix of its blocks' names. The first
# is the main grid; its blocks also hold the loss-matched control's calibration and the presets' cost.
SETTINGS: dict[str, str] = {"digits": "", "digits-long": "long-"}
# The runs that tuned rho for the 20-epoch setting on seeds outside the reported ones (and calibrated its
# loss-matched control): a records folder under results/ and the prefix of its blocks.
TUNING, TUNING_PREFIX = "digits-long-tuning", "tuning-"


def tuning_blocks(records: Sequence[Record]) -> dict[str, str]:
    """The rho tuning: every (method, rho) cell's validation accuracy on the tuning seeds with each method's pick
    (`stats.chosen_by_validation`), and the loss-matched control's calibration on the same seeds."""
    swept = [r for r in sweeps(records).get("rho", []) if r["method"] in TUNED_RHO]
    blocks = {"sweep-rho": tables.sweep_table(summarize(swept), "rho")} if swept else {}
    calibration = [
        r for r in records if r["method"] in ("zsharp-random", "zsharp") and r["percentile"] in (None, 0.95)
    ]
    if any(r["method"] == "zsharp-random" for r in calibration):
        matched = VARIANTS.get(LOSS_MATCHED_LONG)
        blocks["calibration"] = tables.calibration_table(
            [r for r in calibration if r["method"] == "zsharp-random" or r["variant"] == "zsharp"],
            "zsharp",
            "zsharp-random",
            matched and matched.rho,
        )
    return blocks


def results_blocks(results_dir: Path, out_dir: Path) -> dict[str, str]:
    """Every generated block of RESULTS.md from the records under `results_dir` (one folder per setting of
    `SETTINGS`; a setting other than the main one with no records yet has no blocks). Each setting's figures and
    CSVs (summary rows, contrasts) are written into `out_dir`; its records are read once."""
    main = next(iter(SETTINGS))
    blocks = {"preset-cost": preset_cost_table()}
    calibration_dir = results_dir / f"{main}-calibration"
    if calibration_dir.exists():
        matched = VARIANTS.get(LOSS_MATCHED)
        blocks["calibration"] = tables.calibration_table(
            finished_records(calibration_dir), "zsharp", "zsharp-random", matched and matched.rho
        )
    if (results_dir / TUNING).exists():
        made = tuning_blocks(finished_records(results_dir / TUNING))
        blocks.update({TUNING_PREFIX + name: text for name, text in made.items()})
    for dataset, prefix in SETTINGS.items():
        records = finished_records(results_dir / dataset)
        if not records:
            if dataset == main:
                raise ValueError(f"No records under {results_dir / dataset}.")
            continue
        families = family_contrasts(records)
        made = sections(
            records,
            out_dir,
            f"{dataset}-",
            "results/",
            setting="" if dataset == main else dataset,
            families=families,
        )
        blocks.update({prefix + name: text for name, text in made.items()})
        write_atomic(out_dir / f"{dataset}.csv", tables.table_csv(summarize(records)))
        rows = [row for family_rows in families.values() for row in family_rows]
        write_atomic(out_dir / f"{dataset}-contrasts.csv", tables.contrasts_csv(rows))
    return blocks


def write_results(output_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """Rewrite results.md, results.csv and the figures in `output_dir` from every record under it."""
    output_dir = Path(output_dir)
    records = finished_records(output_dir)
    rows = summarize(records)
    paths = {"csv": output_dir / "results.csv", "markdown": output_dir / "results.md"}
    write_atomic(paths["csv"], tables.table_csv(rows))
    text = ["# Reproduction results", ""]
    if command:
        text += [f"Last command: `{command}`", ""]
    text += [
        "Test accuracy at the end of training and at the epoch of best validation accuracy (validation: held out of "
        "the training split); mean [95 % t-interval] over seeds. Contrasts: mean paired difference over the seeds "
        "both ran [95 % t-interval], paired t-test and TOST p-values Holm-corrected within their declared family "
        "(the paper's claim; the same at the tuned radii; the mechanism), per metric.",
        "",
    ]
    for (dataset, model), group in by_dataset_model(records).items():
        prefix = f"{dataset}-{model}-"
        blocks = sections(group, output_dir, prefix)
        text += [f"## {dataset} / {model}", "", blocks["provenance"], blocks["accuracy"], blocks["sharpness"]]
        keys = (
            "paper-claim", "tuned", "mechanism", "sweep-rho", "sweep-percentile", "cost",
            "figure-methods", "figure-loss-at-w", "figure-sweep",
        )  # fmt: skip
        text += [blocks[k] for k in keys if k in blocks]
    write_atomic(paths["markdown"], "\n".join(text))
    return paths


def update_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with the content of each `<!-- generated:NAME -->` block replaced by `blocks[NAME]`.

    Every block of `text` must be given and every given block must be in `text`, so nothing goes stale unseen.
    """
    pattern = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.DOTALL)
    found = [match.group(2) for match in pattern.finditer(text)]
    missing, unknown = sorted(set(blocks) - set(found)), sorted(set(found) - set(blocks))
    if missing or unknown:
        raise ValueError(
            f"Generated blocks missing from the document: {missing}; without content: {unknown}."
        )
    return pattern.sub(lambda m: m.group(1) + blocks[m.group(2)] + m.group(4), text)
