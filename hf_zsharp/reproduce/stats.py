"""Statistics over runs: means with 95 % t-intervals; paired comparisons (t-interval, paired t-test, Cohen's d_z and
an equivalence test, TOST, against margins declared here), Holm-corrected within declared families; a paired
bootstrap of accuracy differences over seeds and test images; and sweeps compared on the seeds all their cells
ran, with the variant validation picks. The t-intervals and tests are scipy.stats'.

Every interval is a 95 % interval of its own, unadjusted for multiplicity: Holm's correction applies to the
p-values, which are what the claims rest on (a contrast is significant when its Holm p is below 0.05)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

from hf_zsharp.reproduce.grid import short_name
from hf_zsharp.reproduce.presets import DEFAULT_PERCENTILE, VARIANTS
from hf_zsharp.sharpness import LANCZOS_TOL

CONFIDENCE = 0.95
Record = Mapping[str, Any]


def _history_mean(key: str) -> Callable[[Record], float | None]:
    """The mean over epochs of a logged per-epoch statistic (None when the run never logged it)."""

    def read(record: Record) -> float | None:
        values = [row[key] for row in record["history"] if key in row]
        return statistics.fmean(values) if values else None

    return read


def _sharpness(key: str) -> Callable[[Record], float | None]:
    return lambda record: (record.get("sharpness") or {}).get(key)


def _sharpness_at(radius: str) -> Callable[[Record], float | None]:
    """The worst-case increase at one of the extra probe radii (`SharpnessSettings.extra_radii`)."""
    return lambda record: ((record.get("sharpness") or {}).get("sharpness_at") or {}).get(radius)


def _converged_eig(key: str) -> Callable[[Record], float | None]:
    """A Hessian end only where Lanczos converged on it (None otherwise). Records written before the
    `*_converged` flags existed are judged by the same test on the residual bound they hold."""

    def read(record: Record) -> float | None:
        measured = record.get("sharpness") or {}
        value, error = measured.get(key), measured.get(f"{key}_error")
        if value is None:
            return None
        converged = measured.get(f"{key}_converged")
        if converged is None:
            converged = error is not None and error <= LANCZOS_TOL * abs(value)
        return value if converged else None

    return read


# What a row summarises, read from each record (None: not measured in that run).
METRICS: dict[str, Callable[[Record], float | None]] = {
    "test_accuracy": lambda r: r["metrics"]["test_accuracy"],
    "test_accuracy_at_best_val": lambda r: r["metrics"]["test_accuracy_at_best_val"],
    "val_accuracy": lambda r: r["metrics"]["val_accuracy"],
    "sharpness": _sharpness("sharpness"),
    "sharpness_0.02": _sharpness_at("0.02"),
    "sharpness_0.2": _sharpness_at("0.2"),
    "scale_invariant_sharpness": _sharpness("scale_invariant_sharpness"),
    "loss_at_w": _sharpness("loss"),  # the mean loss at the trained weights on the sharpness probe's images
    "hessian_max_eig": _converged_eig("hessian_max_eig"),
    "hessian_min_eig": _converged_eig("hessian_min_eig"),
    "loss_increase": _history_mean("sam_loss_increase"),
    "perturbation_norm": _history_mean("sam_perturbation_norm"),
    "mask_jaccard": _history_mean("sam_mask_jaccard"),  # Z-score vs magnitude mask overlap (mask_overlap)
    "wall_time_s": lambda r: r["timing"]["wall_time_s"],
    "train_samples_per_second": lambda r: r["timing"]["train_samples_per_second"],
}
# The compared metrics, each a Holm family of its own within each family of contrasts below.
COMPARED = (
    "test_accuracy",
    "sharpness",
    "sharpness_0.02",
    "sharpness_0.2",
    "scale_invariant_sharpness",
    "loss_at_w",
)
# Equivalence margins, declared before any equivalence test was computed (issue 18): a paired difference whose 90 %
# t-interval lies inside +-margin (both one-sided tests at 5 %, TOST) counts as equivalent. Test accuracy: +-1 pp.
# Worst-case loss increase (the `sharpness` probe, in the loss's unit, nats): +-0.05, a judgement that a change
# of 0.05 in the loss increase within the probe's ball is negligible here. No margin for the loss at w: it is
# reported, not claimed equivalent.
MARGINS = {"test_accuracy": 0.01, "sharpness": 0.05}
# The declared families of contrasts, a - b; Holm's correction runs within a family, per metric.
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    # The paper's claim: ZSharp against the base optimizer and the paper's baselines.
    "paper": (("zsharp", "none"), ("zsharp", "sam"), ("zsharp", "asam"), ("zsharp", "fsam")),
    # The mechanism: ZSharp against each control, one change at a time.
    "mechanism": (
        ("zsharp", "sam-matched"),  # the mask and per-tensor split vs SAM at the same total norm
        ("zsharp", "sam-layerwise"),  # the mask alone, at the same per-tensor radii
        ("zsharp", "zsharp-global"),  # the per-tensor radius (total rho sqrt(L)) vs one global radius rho
        ("zsharp", "zsharp-magnitude"),  # Z-score vs plain |g| selection
        ("zsharp", "zsharp-random"),  # Z-score vs random selection at the same radius
        (
            "zsharp",
            "zsharp-random-loss-matched",
        ),  # Z-score vs random selection pushing as hard (loss increase)
        ("zsharp", "zsharp-random-loss-matched-long"),  # the same, calibrated at 20 epochs
    ),
    # The paper's claim at the radii tuned on validation (TUNED_RHO): each method at its own best radius.
    "tuned": (
        ("zsharp-tuned", "none"),
        ("zsharp-tuned", "sam-tuned"),
        ("zsharp-tuned", "asam-tuned"),
        ("zsharp-tuned", "fsam-tuned"),
    ),
}


# The bootstrap of accuracy differences: resamples, and the seed of its generator (fixed: the tables regenerate).
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


@dataclass(frozen=True)
class Interval:
    """A mean (or mean difference) with its two-sided t confidence interval; bounds None below two values."""

    mean: float
    low: float | None
    high: float | None
    std: float | None
    n: int


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, t-interval (scipy.stats.t: mean +- t_{n-1} s / sqrt(n)) and sample standard deviation of `values`."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, None, n)
    std = statistics.stdev(values)
    if std == 0:
        return Interval(mean, mean, mean, std, n)
    low, high = scipy_stats.t.interval(confidence, n - 1, loc=mean, scale=std / n**0.5)
    return Interval(mean, float(low), float(high), std, n)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison over seeds: the difference's mean and t-interval, the paired t-test, Cohen's d_z, and
    the TOST p-value against the metric's equivalence margin (None without a margin)."""

    difference: Interval
    p: float | None  # two-sided paired t-test; None below two pairs or when all differences are equal
    d_z: float | None  # mean difference / standard deviation of the differences
    p_tost: float | None = None  # the larger of the two one-sided p-values against -margin and +margin
    p_holm: float | None = None
    p_tost_holm: float | None = None


def paired(
    values: Mapping[int, float], baseline: Mapping[int, float], margin: float | None = None
) -> Comparison | None:
    """`values` minus `baseline` over the seeds both have (None without a common seed): scipy's paired t-test, and
    with a `margin` its TOST (equivalent at level a when p_tost < a)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    differences = [values[s] - baseline[s] for s in seeds]
    interval = mean_ci(differences)
    # With all differences equal (up to rounding) the t statistic and d_z are undefined.
    if len(seeds) < 2 or statistics.pstdev(differences) <= 1e-12 * max(1.0, abs(interval.mean)):
        return Comparison(interval, None, None)
    p = float(scipy_stats.ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    p_tost = None
    if margin is not None:
        above = scipy_stats.ttest_1samp(differences, -margin, alternative="greater").pvalue
        below = scipy_stats.ttest_1samp(differences, margin, alternative="less").pvalue
        p_tost = float(max(above, below))
    return Comparison(interval, p, interval.mean / interval.std, p_tost)


def bootstrap_accuracy_difference(a: Sequence[Record], b: Sequence[Record]) -> Interval | None:
    """The accuracy difference a - b over the seeds both ran, with a 95 % percentile interval from a paired
    bootstrap over seeds and test images: each resample draws seeds and test images with replacement, the same
    for a and b. Unlike the t-interval over seeds, it counts the test set's own sampling error (one 360-image
    split). None unless both hold per-image results (`test_correct`) on a common seed."""
    import numpy as np

    correct_a = {r["seed"]: r["test_correct"] for r in a if r.get("test_correct")}
    correct_b = {r["seed"]: r["test_correct"] for r in b if r.get("test_correct")}
    seeds = sorted(correct_a.keys() & correct_b.keys())
    if not seeds:
        return None
    # Per seed, per test image: +1, 0 or -1 (a right and b wrong, both alike, a wrong and b right).
    differences = np.array(
        [[int(x) - int(y) for x, y in zip(correct_a[s], correct_b[s], strict=True)] for s in seeds],
        dtype=float,
    )
    generator = np.random.default_rng(BOOTSTRAP_SEED)
    n_seeds, n_images = differences.shape
    drawn_seeds = generator.integers(n_seeds, size=(BOOTSTRAP_RESAMPLES, n_seeds))
    drawn_images = generator.integers(n_images, size=(BOOTSTRAP_RESAMPLES, n_images))
    counts = np.stack([np.bincount(draw, minlength=n_seeds) for draw in drawn_seeds])  # (resamples, seeds)
    per_image = (
        counts @ differences
    )  # (resamples, images): each image's difference summed over the drawn seeds
    means = np.take_along_axis(per_image, drawn_images, axis=1).mean(axis=1) / n_seeds
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(differences.mean()), float(low), float(high), None, len(seeds))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family: the defined ones); None stays None."""
    defined = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        adjusted[i] = running
    return adjusted


def _order(record: Record) -> tuple:
    method = record["method"]
    rank = list(VARIANTS).index(method) if method in VARIANTS else len(VARIANTS)
    return (
        record["dataset"],
        record["model"],
        rank,
        method,
        record.get("rho") or 0.0,
        record.get("percentile") or 0.0,
        record["seed"],
    )


def group_runs(records: Sequence[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """Records by (dataset, model, variant), in the methods' order then by rho, percentile and seed."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for record in sorted(records, key=_order):
        groups.setdefault((record["dataset"], record["model"], record["variant"]), []).append(record)
    return groups


def summarize(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per (dataset, model, variant): its settings, seeds, and an `Interval` per metric (None where
    unmeasured)."""
    rows = []
    for (dataset, model, variant), group in group_runs(records).items():
        first = group[0]
        row: dict[str, Any] = {
            "dataset": short_name(dataset),
            "model": short_name(model),
            "method": first["method"],
            "variant": variant,
            "default": variant == first["method"],
            "rho": first.get("rho"),
            "sam_rho": first.get("sam_rho"),
            "percentile": first.get("percentile"),
            "seeds": len(group),
            "seed_list": [r["seed"] for r in group],
            "probe": {  # the sharpness settings' radii the group was measured with
                key: sorted({r["sharpness"]["settings"][key] for r in group if key in _settings(r)})
                for key in ("rho", "scale_invariant_rho")
            },
        }
        for name, read in METRICS.items():
            values = [v for v in (read(r) for r in group) if v is not None]
            row[name] = mean_ci(values) if values else None
        rows.append(row)
    return rows


def _settings(record: Record) -> Mapping[str, Any]:
    return (record.get("sharpness") or {}).get("settings") or {}


def _by_seed(group: Sequence[Record], metric: str) -> dict[int, float]:
    read = METRICS[metric]
    return {r["seed"]: v for r in group if (v := read(r)) is not None}


def contrasts(records: Sequence[Record], family: str) -> list[dict[str, Any]]:
    """The declared family's paired comparisons `a - b` (default settings, one dataset and model) for each pair
    that ran, per compared metric: Holm-corrected within the family and metric, p-values and TOST p-values alike."""
    groups = {variant: group for (_, _, variant), group in group_runs(records).items()}
    rows = [{"family": family, "a": a, "b": b} for a, b in FAMILIES[family] if a in groups and b in groups]
    for name in COMPARED:
        margin = MARGINS.get(name)
        comparisons = [
            paired(_by_seed(groups[r["a"]], name), _by_seed(groups[r["b"]], name), margin) for r in rows
        ]
        adjusted = holm([c.p if c else None for c in comparisons])
        adjusted_tost = holm([c.p_tost if c else None for c in comparisons])
        for row, c, p_holm, p_tost_holm in zip(rows, comparisons, adjusted, adjusted_tost):
            row[name] = c and Comparison(c.difference, c.p, c.d_z, c.p_tost, p_holm, p_tost_holm)
    for row in rows:
        row["test_accuracy_bootstrap"] = bootstrap_accuracy_difference(groups[row["a"]], groups[row["b"]])
    return rows


def _at_default_rho(record: Record) -> bool:
    return record.get("rho") == VARIANTS[record["method"]].rho if record["method"] in VARIANTS else True


def _at_default_percentile(record: Record) -> bool:
    return record.get("percentile") in (None, DEFAULT_PERCENTILE)


SWEEP_AXES = {
    "rho": _at_default_percentile,
    "percentile": _at_default_rho,
}  # axis -> the other one at default


def sweeps(records: Sequence[Record]) -> dict[str, list[Record]]:
    """The sweeps the records hold, by axis: the runs of every method with more than one value on that axis (the
    other axis at its default), restricted to the seeds that every cell of the sweep ran, so that cells and picks
    compare the same seeds."""
    found = {}
    for axis, other_at_default in SWEEP_AXES.items():
        cells: dict[str, dict[Any, set[int]]] = {}
        for r in records:
            if other_at_default(r):
                cells.setdefault(r["method"], {}).setdefault(r.get(axis), set()).add(r["seed"])
        swept = {method: values for method, values in cells.items() if len(values) > 1}
        if not swept:
            continue
        seeds = set.intersection(*(s for values in swept.values() for s in values.values()))
        found[axis] = [
            r for r in records if r["method"] in swept and other_at_default(r) and r["seed"] in seeds
        ]
    return found


def probe_radius(rows: Sequence[Mapping[str, Any]], setting: str = "rho") -> float | None:
    """The radius of a worst-case probe (`rho`, or `scale_invariant_rho`) that the rows' records were measured
    with (their sharpness settings); None if none was. Runs measured at different radii cannot share a column:
    ValueError."""
    radii = {rho for row in rows for rho in row["probe"][setting]}
    if len(radii) > 1:
        raise ValueError(f"the records measured sharpness at different radii {sorted(radii)}: not comparable")
    return radii.pop() if radii else None


def rank_correlation(
    records: Sequence[Record], x: str, y: str, within_methods: bool = False
) -> tuple[float, float, int] | None:
    """Spearman's rank correlation of two metrics over the runs at default settings that hold both (scipy.stats):
    (r, two-sided p, runs); None below three runs. `within_methods`: of the values centred on their method's mean,
    so that differences between methods play no part (the pooled correlation mixes both)."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r["variant"] == r["method"] and METRICS[x](r) is not None and METRICS[y](r) is not None:
            runs.setdefault(r["method"], []).append((METRICS[x](r), METRICS[y](r)))
    pairs = [pair for group in runs.values() for pair in group]
    if within_methods:
        pairs = [
            (a - statistics.fmean(p for p, _ in group), b - statistics.fmean(q for _, q in group))
            for group in runs.values()
            for a, b in group
        ]
    if len(pairs) < 3:
        return None
    result = scipy_stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return float(result.statistic), float(result.pvalue), len(pairs)


def calibrated_rho(records: Sequence[Record], target: str, control: str) -> tuple[float, float]:
    """The radius at which `control` pushes as hard as `target`: its mean in-training loss increase
    L(w+e) - L(w), interpolated linearly in rho between the two control radii that bracket the target's mean.
    Returns (the target's mean loss increase, the radius). ValueError if no two radii bracket it."""
    read = METRICS["loss_increase"]
    aim = statistics.fmean(read(r) for r in records if r["variant"] == target)
    by_rho: dict[float, list[float]] = {}
    for r in records:
        if r["method"] == control:
            by_rho.setdefault(r["rho"], []).append(read(r))
    points = sorted((rho, statistics.fmean(values)) for rho, values in by_rho.items())
    for (rho_a, a), (rho_b, b) in zip(points, points[1:]):
        if min(a, b) <= aim <= max(a, b) and a != b:
            return aim, rho_a + (aim - a) * (rho_b - rho_a) / (b - a)
    raise ValueError(f"no two {control} radii bracket {target}'s loss increase {aim:.4f}: {points}")


def chosen_by_validation(rows: Sequence[Mapping[str, Any]], method: str) -> Mapping[str, Any] | None:
    """Among rows of one dataset and model: the variant of `method` with the highest mean validation accuracy
    (ties: the first in row order). This is how a sweep picks rho; test accuracy only reports the pick."""
    candidates = [r for r in rows if r["method"] == method and r["val_accuracy"] is not None]
    return max(candidates, key=lambda r: r["val_accuracy"].mean, default=None)
