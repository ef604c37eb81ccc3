"""Statistics, tables, figures and generated Markdown blocks of the reproduction, on hand-made records."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from scipy.stats import spearmanr, ttest_1samp, ttest_rel

from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.presets import LOSS_MATCHED, VARIANTS
from hf_zsharp.reproduce.records import finished_records, write_record
from hf_zsharp.reproduce.stats import (
    MARGINS,
    calibrated_rho,
    chosen_by_validation,
    contrasts,
    holm,
    mean_ci,
    paired,
    rank_correlation,
    summarize,
    sweeps,
)
from hf_zsharp.reproduce.tables import (
    accuracy_table,
    calibration_table,
    contrast_table,
    contrasts_csv,
    sharpness_table,
    sweep_table,
    table_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_4 = 2.7764451051977987  # the 97.5 % quantile of Student's t with 4 degrees of freedom


def record(method, seed, test, *, variant=None, rho=0.05, val=None, sharp=None, norm=0.05, increase=0.1):
    """A hand-made run record with the fields the statistics read."""
    return {
        "dataset": "digits",
        "model": "resnet20",
        "method": method,
        "variant": variant or method,
        "seed": seed,
        "rho": None if method == "none" else rho,
        "sam_rho": None if method == "none" else rho,
        "percentile": 0.95 if method.startswith("zsharp") else None,
        "metrics": {
            "test_accuracy": test,
            "test_accuracy_at_best_val": test - 0.01,
            "val_accuracy": test if val is None else val,
        },
        "history": [
            {
                "epoch": e,
                "eval_accuracy": test * e / 2,
                **(
                    {}
                    if method == "none"
                    else {"sam_loss_increase": increase * e, "sam_perturbation_norm": norm}
                ),
            }
            for e in (1.0, 2.0)
        ],  # fmt: skip
        "sharpness": None
        if sharp is None
        else {"sharpness": sharp, "hessian_max_eig": 100 * sharp, "hessian_min_eig": -sharp},  # fmt: skip
        "timing": {"wall_time_s": 10.0 + seed, "train_samples_per_second": 100.0},
        "code": {"commit": "abc1234567890", "dirty": False, "source_sha256": "f" * 64},
        "environment": {"device": "CPU (x86_64)", "threads": "1", "platform": "Linux", "torch": "2.x"},
    }


SAM = [0.90, 0.92, 0.91, 0.93, 0.89]
ZSHARP = [0.92, 0.93, 0.915, 0.95, 0.90]
RANDOM = [0.90, 0.925, 0.90, 0.94, 0.88]


def grid_records():
    runs = [record("sam", s, a, sharp=0.5 + 0.01 * s) for s, a in enumerate(SAM)]
    runs += [record("zsharp", s, a, sharp=0.3 + 0.02 * s, norm=0.22) for s, a in enumerate(ZSHARP)]
    runs += [record("zsharp-random", s, a, sharp=0.5 + 0.011 * s, norm=0.22) for s, a in enumerate(RANDOM)]
    runs += [record("none", 0, 0.80)]
    return runs


def test_mean_ci_is_the_t_interval():
    interval = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_4 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == 3.0 and interval.n == 5
    assert (interval.low, interval.high) == (
        pytest.approx(3 - half, rel=1e-12),
        pytest.approx(3 + half, rel=1e-12),
    )
    one = mean_ci([0.7])
    assert (one.mean, one.low, one.high, one.std) == (0.7, None, None, None)


def test_paired_comparison_pairs_by_seed():
    values = dict(enumerate(ZSHARP)) | {9: 0.5}  # seed 9 has no SAM partner: left out
    c = paired(values, dict(enumerate(SAM)) | {7: 0.1})
    differences = [z - s for z, s in zip(ZSHARP, SAM)]
    assert c.difference.n == 5
    assert c.difference.mean == pytest.approx(sum(differences) / 5, rel=1e-12)
    assert c.p == pytest.approx(ttest_rel(ZSHARP, SAM).pvalue, rel=1e-9)
    assert c.d_z == pytest.approx(c.difference.mean / c.difference.std, rel=1e-12)
    assert c.difference.low < c.difference.mean < c.difference.high
    # Equal differences: the t statistic and d_z are undefined; one pair: no interval either.
    same = paired({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})
    assert same.p is None and same.d_z is None and same.difference.mean == pytest.approx(0.1)
    assert paired({0: 0.5}, {0: 0.4}).difference.low is None
    assert paired({0: 0.5}, {1: 0.4}) is None


def test_holm_step_down():
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, and monotone
    assert holm([]) == []


def test_summary_rows_hold_each_metric_with_its_interval():
    rows = {row["variant"]: row for row in summarize(grid_records())}
    assert list(rows) == ["none", "sam", "zsharp", "zsharp-random"]  # the methods' order, not the runs'
    z = rows["zsharp"]
    assert z["seeds"] == 5 and z["test_accuracy"].mean == pytest.approx(sum(ZSHARP) / 5)
    assert z["perturbation_norm"].mean == pytest.approx(0.22)
    assert z["loss_increase"].mean == pytest.approx(0.15)
    assert rows["none"]["loss_increase"] is None and rows["none"]["sharpness"] is None
    assert not any(key.endswith("_vs_sam") for key in z)  # comparisons live in the declared families only


def test_the_paper_family_compares_zsharp_with_the_baselines_holm_within_it():
    runs = grid_records() + [record("asam", s, a - 0.01, sharp=0.45) for s, a in enumerate(SAM)]
    rows = contrasts(runs, "paper")
    assert [(r["family"], r["a"], r["b"]) for r in rows] == [
        ("paper", "zsharp", "none"), ("paper", "zsharp", "sam"), ("paper", "zsharp", "asam"),
    ]  # fmt: skip
    none, sam, asam = rows
    assert none["test_accuracy"].p is None  # one pair
    p_sam = ttest_rel(ZSHARP, SAM).pvalue
    p_asam = ttest_rel(ZSHARP, [a - 0.01 for a in SAM]).pvalue
    assert sam["test_accuracy"].p == pytest.approx(p_sam, rel=1e-9)
    assert [sam["test_accuracy"].p_holm, asam["test_accuracy"].p_holm] == pytest.approx(holm([p_sam, p_asam]))
    # Sharpness differences: (0.3 + 0.02 s) - (0.5 + 0.01 s) over seeds 0..4, a family of its own.
    assert sam["sharpness"].difference.mean == pytest.approx(-0.18)
    assert contrasts(runs, "mechanism")[0]["b"] == "zsharp-random"  # the controls are the other family


def test_tost_is_two_one_sided_t_tests_against_the_declared_margins():
    base = {s: 0.9 for s in range(8)}
    close = {s: 0.9 + d for s, d in enumerate([0.001, -0.002, 0.003, 0.0, -0.001, 0.002, 0.001, -0.003])}
    c = paired(close, base, MARGINS["test_accuracy"])
    differences = [close[s] - 0.9 for s in range(8)]
    lower = ttest_1samp(differences, -0.01, alternative="greater").pvalue
    upper = ttest_1samp(differences, 0.01, alternative="less").pvalue
    assert (
        c.p_tost == pytest.approx(max(lower, upper), rel=1e-9) and c.p_tost < 0.05
    )  # equivalent within 1 pp
    # The same spread around a 1 pp shift is not equivalent, however clearly it differs from zero.
    shifted = paired({s: v + 0.01 for s, v in close.items()}, base, MARGINS["test_accuracy"])
    assert shifted.p < 0.001 and shifted.p_tost >= 0.5
    assert paired(close, base).p_tost is None  # no margin, no equivalence test
    # TOST at 5 % agrees with the 90 % t-interval lying inside the margin.
    ninety = mean_ci(differences, confidence=0.90)
    assert (c.p_tost < 0.05) == (ninety.low > -0.01 and ninety.high < 0.01)


def test_contrasts_of_zsharp_with_its_controls():
    rows = contrasts(grid_records(), "mechanism")
    assert [(r["a"], r["b"]) for r in rows] == [("zsharp", "zsharp-random")]  # the controls that ran
    (row,) = rows
    assert row["test_accuracy"].p == pytest.approx(ttest_rel(ZSHARP, RANDOM).pvalue, rel=1e-9)
    assert row["test_accuracy"].p_holm == row["test_accuracy"].p  # a family of one
    assert row["sharpness"].difference.mean == pytest.approx(
        -0.2 + 0.009 * 2
    )  # (0.3 + 0.02 s) - (0.5 + 0.011 s)
    assert contrast_table(rows).count("| zsharp − zsharp-random | 5 |") == 1


def test_a_measure_some_runs_lack_is_compared_on_the_pairs_that_hold_it_and_says_how_many():
    runs = grid_records()
    for r in runs:  # the scale-invariant probe, measured later: seeds 0-2 only
        if r["sharpness"] is not None and r["seed"] < 3:
            r["sharpness"]["scale_invariant_sharpness"] = (
                4 * r["sharpness"]["sharpness"] + 0.001 * r["seed"] ** 2
            )
    (row,) = contrasts(runs, "mechanism")
    c = row["scale_invariant_sharpness"]
    expected = [4 * (0.02 - 0.011) * s - 0.8 for s in range(3)]  # 4 (0.3 + 0.02 s) - 4 (0.5 + 0.011 s)
    assert c.difference.n == 3 and c.difference.mean == pytest.approx(sum(expected) / 3)
    table = contrast_table([row])
    assert "Δ scale-invariant worst case" in table and " (3 pairs) |" in table
    assert "| zsharp − zsharp-random | 5 |" in table  # the accuracy pairs
    for r in runs:
        if r["sharpness"] is not None:
            r["sharpness"].pop("scale_invariant_sharpness", None)
    assert "scale-invariant" not in contrast_table(
        contrasts(runs, "mechanism")
    )  # nobody measured it: no column


def test_sweeps_compare_their_cells_on_common_seeds_and_pick_on_validation_not_test():
    runs = grid_records()
    # rho 0.1 ran seeds 0-2 only: better on test, worse on validation. Validation must pick the default (0.05).
    runs += [record("sam", s, 0.99, variant="sam_rho0.1", rho=0.1, val=0.5) for s in range(3)]
    (axis, swept), *others = sweeps(runs).items()
    assert axis == "rho" and others == []
    assert {(r["variant"], r["seed"]) for r in swept} == {
        (v, s) for v in ("sam", "sam_rho0.1") for s in range(3)
    }
    rows = summarize(swept)
    assert chosen_by_validation(rows, "sam")["variant"] == "sam"
    table = sweep_table(rows, "rho")
    assert "Every cell on seeds 0–2" in table
    # No cell has a percentile (SAM): the column is left out.
    assert "| sam (chosen by val.) | 0.05 | 3 |" in table and "| sam | 0.1 | 3 |" in table
    assert "sam_rho0.1" not in accuracy_table(
        summarize(runs)
    )  # the main tables hold the default settings only


def test_tables_and_csv():
    rows = summarize(grid_records())
    accuracy = accuracy_table(rows)
    z = mean_ci([100 * a for a in ZSHARP])
    assert f"| zsharp | 0.05 | 5 | {z.mean:.2f} [{z.low:.2f}, {z.high:.2f}] |" in accuracy
    assert "| none | — | 1 | 80.00 | 79.00 |" in accuracy
    sharpness = sharpness_table(rows)
    assert "| zsharp | 0.220 [0.220, 0.220] | 0.150 [0.150, 0.150] |" in sharpness
    cells = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert [c["variant"] for c in cells] == ["none", "sam", "zsharp", "zsharp-random"]
    assert float(cells[2]["test_accuracy_mean"]) == pytest.approx(sum(ZSHARP) / 5)
    (contrast,) = csv.DictReader(io.StringIO(contrasts_csv(contrasts(grid_records(), "mechanism"))))
    assert contrast["family"] == "mechanism" and contrast["sharpness_pairs"] == "5"
    assert float(contrast["test_accuracy_p"]) == pytest.approx(ttest_rel(ZSHARP, RANDOM).pvalue, rel=1e-9)
    assert contrast["test_accuracy_bootstrap_low"] == ""  # these records hold no per-image results
    with_images = grid_records()
    for run in with_images:  # per-image results whose accuracy is the run's, to the image
        right = round(run["metrics"]["test_accuracy"] * 200)
        run["test_correct"] = "1" * right + "0" * (200 - right)
    (contrast,) = csv.DictReader(io.StringIO(contrasts_csv(contrasts(with_images, "mechanism"))))
    boot = contrasts(with_images, "mechanism")[0]["test_accuracy_bootstrap"]
    assert [float(contrast[f"test_accuracy_bootstrap_{k}"]) for k in ("delta", "low", "high")] == [
        boot.mean, boot.low, boot.high,
    ]  # fmt: skip
    assert boot.low < float(contrast["test_accuracy_delta"]) < boot.high


def test_results_files_and_figures(tmp_path):
    runs = grid_records() + [
        record("sam", s, 0.9, variant="sam_rho0.1", rho=0.1, sharp=0.6) for s in range(5)
    ]
    for run in runs:
        write_record(tmp_path / "digits" / "resnet20" / run["variant"] / f"seed-{run['seed']}", run)
    (tmp_path / "digits" / "resnet20" / "sam" / "seed-9").mkdir()  # an unfinished run: left out
    paths = report.write_results(tmp_path, command="hf-zsharp-reproduce digits")
    markdown = paths["markdown"].read_text()
    assert "Last command: `hf-zsharp-reproduce digits`" in markdown and "## digits / resnet20" in markdown
    assert "- 21 runs," in markdown and "commit abc1234567, source hash ffffffffffff (21 runs)" in markdown
    for name in ("digits-resnet20-methods.png", "digits-resnet20-sweep.png"):
        assert f"({name})" in markdown
        png = (tmp_path / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) < 300_000
    assert len(list(csv.DictReader(io.StringIO(paths["csv"].read_text())))) == 5
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporary files
    assert json.loads((tmp_path / "digits/resnet20/sam/seed-0/run.json").read_text())["seed"] == 0


def test_generated_blocks_are_replaced_and_checked():
    text = "intro\n<!-- generated:a -->\nold\n<!-- /generated:a -->\nmiddle\n<!-- generated:b -->\n<!-- /generated:b -->\n"
    new = report.update_blocks(text, {"a": "A\n", "b": "B\n"})
    assert (
        new
        == "intro\n<!-- generated:a -->\nA\n<!-- /generated:a -->\nmiddle\n<!-- generated:b -->\nB\n<!-- /generated:b -->\n"
    )
    assert report.update_blocks(new, {"a": "A\n", "b": "B\n"}) == new
    with pytest.raises(ValueError, match="missing.*'c'"):
        report.update_blocks(text, {"a": "", "b": "", "c": ""})
    with pytest.raises(ValueError, match="without content.*'b'"):
        report.update_blocks(text, {"a": ""})


def test_hessian_ends_are_shown_only_where_lanczos_converged():
    runs = grid_records()
    for run in runs:
        if run["sharpness"] is not None:
            run["sharpness"] |= {
                "hessian_max_eig_converged": True,
                "hessian_min_eig_converged": run["seed"] < 2,
            }
    zsharp_old = [r for r in runs if r["method"] == "zsharp"]
    for run in zsharp_old:  # a record from before the flags: judged by its residual bound
        del run["sharpness"]["hessian_max_eig_converged"], run["sharpness"]["hessian_min_eig_converged"]
        run["sharpness"] |= {"hessian_max_eig_error": 0.0, "hessian_min_eig_error": 1.0}
    rows = {row["variant"]: row for row in summarize(runs)}
    assert rows["sam"]["hessian_min_eig"].n == 2 and rows["sam"]["hessian_max_eig"].n == 5
    assert rows["zsharp"]["hessian_min_eig"] is None and rows["zsharp"]["hessian_max_eig"].n == 5
    table = sharpness_table(list(rows.values()))
    assert "(2/5) |" in table and "| withheld (0/5 converged) |" in table


def test_the_worst_case_column_names_the_radius_the_records_were_measured_at():
    runs = grid_records()
    for run in runs:
        if run["sharpness"] is not None:
            run["sharpness"]["settings"] = {"rho": 0.1}
    rows = summarize(runs)
    assert "Worst-case increase (ρ=0.1)" in sharpness_table(rows)
    runs[0]["sharpness"]["settings"] = {"rho": 0.05}
    with pytest.raises(ValueError, match=r"different radii \[0.05, 0.1\]"):
        sharpness_table(summarize(runs))


def test_the_loss_matched_radius_interpolates_between_the_bracketing_control_radii():
    runs = [record("zsharp", s, 0.9, increase=0.2) for s in (100, 101)]  # mean loss increase 1.5 x 0.2 = 0.3
    runs += [
        record("zsharp-random", 100, 0.9, variant=f"zsharp-random_rho{rho:g}", rho=rho, increase=increase)
        for rho, increase in ((0.05, 0.08), (0.1, 0.16), (0.2, 0.24))
    ]  # mean loss increases 0.12, 0.24, 0.36: 0.3 lies halfway between rho 0.1 and 0.2
    assert calibrated_rho(runs, "zsharp", "zsharp-random") == (pytest.approx(0.3), pytest.approx(0.15))
    table = calibration_table(runs, "zsharp", "zsharp-random", 0.15)
    assert "| zsharp | 0.05 | 100, 101 |" in table and "| zsharp-random | 0.2 | 100 |" in table
    assert (
        "matches zsharp's mean loss increase 0.3000 at ρ = 0.1500" in table and "runs at ρ = 0.15." in table
    )
    with pytest.raises(ValueError, match="no two zsharp-random radii bracket"):
        calibrated_rho(runs[:3], "zsharp", "zsharp-random")


def test_rank_correlation_pools_the_runs_at_default_settings():
    runs = grid_records() + [record("sam", 0, 0.9, variant="sam_rho0.1", rho=0.1, sharp=9.0)]  # not default
    for run in runs:
        if run["sharpness"] is not None:
            run["sharpness"]["loss"] = 1.0 - run["sharpness"]["sharpness"] + 0.001 * run["seed"] ** 2
    pooled = [r for r in runs if r["sharpness"] is not None and r["variant"] == r["method"]]
    expected = spearmanr(
        [r["sharpness"]["loss"] for r in pooled], [r["sharpness"]["sharpness"] for r in pooled]
    )
    r, p, n = rank_correlation(runs, "loss_at_w", "sharpness")
    assert n == 15 and (r, p) == (pytest.approx(expected.statistic), pytest.approx(expected.pvalue))
    assert rank_correlation(runs[:2], "loss_at_w", "sharpness") is None


def test_the_loss_matched_preset_uses_the_radius_its_committed_calibration_gives():
    calibration = finished_records(Path(__file__).resolve().parents[1] / "results" / "digits-calibration")
    assert {r["seed"] for r in calibration} == {100}  # outside the reported seeds 0-9
    _, rho = calibrated_rho(calibration, "zsharp", "zsharp-random")
    assert VARIANTS[LOSS_MATCHED].rho == round(rho, 3)


def test_a_sweep_alone_with_sharpness_writes_its_report_without_the_loss_at_w_figure(tmp_path):
    """Runs off their method's default settings (a percentile sweep) with sharpness: the loss-at-w figure pools
    default-setting runs only, so it is left out instead of failing the report after the first run."""
    for seed in (0, 1):
        run = record("zsharp", seed, 0.8, variant="zsharp_q0.9", sharp=0.3)
        run["sharpness"]["loss"] = 0.5
        write_record(tmp_path / "digits" / "resnet20" / "zsharp_q0.9" / f"seed-{seed}", run)
    blocks = report.sections(finished_records(tmp_path), tmp_path / "figures")
    assert "figure-loss-at-w" not in blocks and "sharpness" in blocks


def _with_correct(seed: int, correct: str) -> dict:
    return {"seed": seed, "test_correct": correct}


def test_the_bootstrap_resamples_seeds_and_test_images_together():
    """The vectorised bootstrap equals the plain one (the same draws: seeds, then images, per resample), its
    mean is the mean paired difference, and it is None without per-image results on a common seed."""
    import numpy as np

    from hf_zsharp.reproduce import stats

    rng = np.random.default_rng(1)
    a = [_with_correct(s, "".join(rng.choice(["0", "1"], 40))) for s in range(5)]
    b = [_with_correct(s, "".join(rng.choice(["0", "1"], 40))) for s in range(5)]
    found = stats.bootstrap_accuracy_difference(a, b)
    differences = np.array(
        [[int(x) - int(y) for x, y in zip(p["test_correct"], q["test_correct"])] for p, q in zip(a, b)]
    )
    generator = np.random.default_rng(stats.BOOTSTRAP_SEED)
    seeds = generator.integers(5, size=(stats.BOOTSTRAP_RESAMPLES, 5))
    images = generator.integers(40, size=(stats.BOOTSTRAP_RESAMPLES, 40))
    plain = [differences[seeds[r]][:, images[r]].mean() for r in range(stats.BOOTSTRAP_RESAMPLES)]
    low, high = np.percentile(plain, [2.5, 97.5])
    assert found.mean == pytest.approx(differences.mean()) and found.n == 5
    assert (found.low, found.high) == pytest.approx((low, high), abs=1e-12)
    assert stats.bootstrap_accuracy_difference(a, [{"seed": 9, "test_correct": "1" * 40}]) is None
    assert stats.bootstrap_accuracy_difference(a, [{"seed": 0}]) is None
    same = stats.bootstrap_accuracy_difference(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_the_tuned_family_has_its_block_only_where_the_tuned_radii_ran(tmp_path):
    """The paper's claim at the radii tuned on validation is its own Holm family and its own block of RESULTS.md,
    present once a setting holds tuned runs (their variants are their own rows, not a rho sweep of the method)."""
    runs = grid_records()
    runs += [record("zsharp-tuned", s, a + 0.01, rho=0.01) for s, a in enumerate(ZSHARP)]
    runs += [record("sam-tuned", s, a, rho=0.1) for s, a in enumerate(SAM)]
    rows = contrasts(runs, "tuned")
    assert [(r["a"], r["b"]) for r in rows] == [("zsharp-tuned", "none"), ("zsharp-tuned", "sam-tuned")]
    assert rows[1]["test_accuracy"].p_holm == pytest.approx(ttest_rel([a + 0.01 for a in ZSHARP], SAM).pvalue)
    for run in runs:
        write_record(tmp_path / "digits" / "resnet20" / run["variant"] / f"seed-{run['seed']}", run)
    blocks = report.sections(finished_records(tmp_path), tmp_path / "figures")
    assert "| zsharp-tuned − sam-tuned | 5 |" in blocks["tuned"] and "sweep-rho" not in blocks
    assert "zsharp-tuned" not in blocks["paper-claim"]
    untuned = tmp_path / "untuned"
    for run in grid_records():
        write_record(untuned / "digits" / "resnet20" / run["variant"] / f"seed-{run['seed']}", run)
    assert "tuned" not in report.sections(finished_records(untuned), tmp_path / "figures")
