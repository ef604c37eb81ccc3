"""scripts/make_results.py on a copy of some committed records: bad records named, --check writing nothing and
naming stray files, and --collect refusing a record of another run, a second record of one run, a record that
cannot join its table row, and a change of metrics without --replace, before anything is copied."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.records import read_record

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "digits" / "digits" / "resnet20"


@pytest.fixture
def make_results(tmp_path, monkeypatch):
    """The script bound to a temporary results/ (sam and zsharp, seeds 0-2) and RESULTS.md (generated once)."""
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(report, "preset_cost_table", lambda: "cost\n")  # FLOP counting is tested elsewhere
    results = tmp_path / "results"
    for method in ("sam", "zsharp"):
        for seed in range(3):
            target = results / "digits" / "digits" / "resnet20" / method / f"seed-{seed}"
            target.mkdir(parents=True)
            shutil.copyfile(COMMITTED / method / f"seed-{seed}" / "run.json", target / "run.json")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "RESULTS", results)
    monkeypatch.setattr(module, "DOCUMENT", tmp_path / "RESULTS.md")
    names = report.results_blocks(results, tmp_path / "scratch")
    module.DOCUMENT.write_text(
        "".join(f"<!-- generated:{n} -->\n<!-- /generated:{n} -->\n" for n in names), encoding="utf-8"
    )
    run(module)
    return module


def run(module, *argv):
    sys.argv = ["make_results.py", *argv]
    module.main()


def snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def put(grid: Path, folder: str, record: dict) -> Path:
    """Write `record` as `grid/folder/run.json`, as a grid would."""
    path = grid / folder / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{garbage", "unreadable run record"),
        ("[1, 2]", "a run record is a JSON object, found a list"),
        ("NUMERIC", "field metrics.test_accuracy must be a finite number, found 'high'"),
    ],
)
def test_a_bad_record_stops_it_naming_the_file(make_results, content, problem):
    path = make_results.RESULTS / "digits/digits/resnet20/sam/seed-1/run.json"
    if content == "NUMERIC":
        record = json.loads(path.read_text())
        record["metrics"]["test_accuracy"] = "high"
        content = json.dumps(record)
    path.write_text(content)
    before = snapshot(make_results.ROOT)
    for argv in ((), ("--check",)):
        with pytest.raises(SystemExit, match=f"error: {path}: {problem}"):
            run(make_results, *argv)
    assert snapshot(make_results.ROOT) == before


def test_check_writes_nothing_and_names_what_is_stale(make_results):
    before = snapshot(make_results.ROOT)
    run(make_results, "--check")  # up to date: exits normally
    assert snapshot(make_results.ROOT) == before
    figure = make_results.RESULTS / "digits-methods.png"
    figure.write_bytes(b"stale")
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit, match="results/digits-methods.png differ"):
        run(make_results, "--check")
    assert snapshot(make_results.ROOT) == before


def test_collect_refuses_to_replace_a_record_of_another_run(make_results, tmp_path):
    grid = tmp_path / "reproduce-digits"
    for seed in range(3):  # the whole row: its runs share one command
        committed = make_results.RESULTS / f"digits/digits/resnet20/sam/seed-{seed}/run.json"
        smoke = json.loads(committed.read_text())
        smoke["command"] = smoke["command"].replace("--epochs 4", "--epochs 1")
        smoke["argv"][smoke["argv"].index("--num_train_epochs") + 1] = "1"
        smoke["metrics"]["test_accuracy"] = 0.1
        put(grid, f"digits/resnet20/sam/seed-{seed}", smoke)
    committed = make_results.RESULTS / "digits/digits/resnet20/sam/seed-0/run.json"
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit, match=r"(?s)would replace .*sam/seed-0/run.json.*--epochs 4.*--epochs 1"):
        run(make_results, "--collect", str(grid))
    assert snapshot(make_results.ROOT) == before

    run(make_results, "--collect", str(grid), "--replace")
    assert json.loads(committed.read_text())["metrics"]["test_accuracy"] == 0.1


def test_collect_takes_the_same_run_made_in_another_folder(make_results, tmp_path):
    grid = tmp_path / "elsewhere"
    committed = make_results.RESULTS / "digits/digits/resnet20/zsharp/seed-2/run.json"
    rerun = json.loads(committed.read_text())
    rerun["argv"][rerun["argv"].index("--output_dir") + 1] = "/somewhere/else/zsharp/seed-2"
    rerun["hyperparameters"]["training"]["output_dir"] = "/somewhere/else/zsharp/seed-2"
    rerun["finished_at"] = "later"
    (grid / "digits/resnet20/zsharp/seed-2").mkdir(parents=True)
    (grid / "digits/resnet20/zsharp/seed-2/run.json").write_text(json.dumps(rerun))
    run(make_results, "--collect", str(grid))
    assert json.loads(committed.read_text())["finished_at"] == "later"


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_collect_from_a_folder_without_records_is_an_error_and_writes_nothing(make_results, tmp_path, make):
    grid = tmp_path / "reproduce-digit"  # a misspelt or wrong folder
    if make == "empty":
        (grid / "digits").mkdir(parents=True)
    before = snapshot(make_results.ROOT)
    problem = "holds no run.json" if make == "empty" else "is not a folder"
    with pytest.raises(SystemExit, match=f"--collect {grid} {problem}: give the --output_dir"):
        run(make_results, "--collect", str(grid))
    assert snapshot(make_results.ROOT) == before


def test_collect_into_another_records_folder(make_results, tmp_path):
    grid = tmp_path / "calibration"
    source = make_results.RESULTS / "digits/digits/resnet20/zsharp/seed-0/run.json"
    (grid / "digits/resnet20/zsharp/seed-0").mkdir(parents=True)
    shutil.copyfile(source, grid / "digits/resnet20/zsharp/seed-0/run.json")
    before = (make_results.ROOT / "RESULTS.md").read_text()
    run(make_results, "--collect", str(grid), "--into", "digits-extra")
    assert (make_results.RESULTS / "digits-extra/digits/resnet20/zsharp/seed-0/run.json").exists()
    assert (make_results.ROOT / "RESULTS.md").read_text() == before  # the digits tables do not take them in


def test_the_second_setting_gets_its_own_blocks_csv_and_figures(make_results, tmp_path):
    """Records collected into digits-long fill the document's `long-` blocks; a document without them is refused,
    naming the blocks, before anything is written."""
    grid = tmp_path / "reproduce-digits-long"
    for method in ("sam", "zsharp"):
        for seed in range(3):
            source = make_results.RESULTS / f"digits/digits/resnet20/{method}/seed-{seed}/run.json"
            (grid / f"digits/resnet20/{method}/seed-{seed}").mkdir(parents=True)
            shutil.copyfile(source, grid / f"digits/resnet20/{method}/seed-{seed}/run.json")
    document = make_results.DOCUMENT.read_text()
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit, match=r"missing from the document: \['long-accuracy'"):
        run(make_results, "--collect", str(grid), "--into", "digits-long")
    assert (
        snapshot(make_results.ROOT) == before
    )  # rendered before anything is copied: no record copied either

    staged = tmp_path / "staged"
    shutil.copytree(make_results.RESULTS, staged)
    shutil.copytree(grid, staged / "digits-long")
    names = report.results_blocks(staged, tmp_path / "scratch")
    long_names = sorted(n for n in names if n.startswith("long-"))
    assert {"long-provenance", "long-accuracy", "long-sharpness", "long-mechanism"} <= set(long_names)
    make_results.DOCUMENT.write_text(
        document + "".join(f"<!-- generated:{n} -->\n<!-- /generated:{n} -->\n" for n in long_names)
    )
    run(make_results, "--collect", str(grid), "--into", "digits-long")
    assert (make_results.RESULTS / "digits-long.csv").exists()
    assert (make_results.RESULTS / "digits-long-methods.png").exists()
    text = make_results.DOCUMENT.read_text()
    assert "<!-- generated:long-accuracy -->\n| Method" in text
    run(make_results, "--check")


def test_collect_refuses_a_second_record_of_the_same_run(make_results, tmp_path):
    """A parent folder holding a copy of a committed record: copied in under another relative folder, it would
    count the run twice in its row."""
    committed = make_results.RESULTS / "digits/digits/resnet20/sam/seed-0/run.json"
    parent = tmp_path / "runs"
    copy = put(parent / "reproduce-digits", "digits/resnet20/sam/seed-0", json.loads(committed.read_text()))
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit) as refused:
        run(make_results, "--collect", str(parent))
    assert str(refused.value) == (
        f"error: {copy} is a second record of digits/resnet20 sam seed 0 (the first: {committed})"
    )
    assert snapshot(make_results.ROOT) == before


def test_collect_refuses_a_record_of_another_preset_or_length_into_a_row(make_results, tmp_path):
    """A 20-epoch digits-long run collected into the digits setting would join the 4-epoch runs' row."""
    long_run = json.loads((ROOT / "results/digits-long/digits/resnet20/sam/seed-3/run.json").read_text())
    source = put(tmp_path / "reproduce-digits-long", "digits/resnet20/sam/seed-3", long_run)
    first = make_results.RESULTS / "digits/digits/resnet20/sam/seed-0/run.json"
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit) as refused:
        run(make_results, "--collect", str(tmp_path / "reproduce-digits-long"))
    assert str(refused.value) == (
        f"error: {source} cannot be pooled with {first} (digits/resnet20 sam): preset digits-long, not digits; "
        "epochs 20, not 4"
    )
    assert snapshot(make_results.ROOT) == before


@pytest.mark.parametrize(("key", "value"), [("test_accuracy", float("nan")), ("test_loss", float("inf"))])
def test_a_record_with_a_non_finite_metric_is_refused_before_anything_is_copied(
    make_results, tmp_path, key, value
):
    committed = make_results.RESULTS / "digits/digits/resnet20/sam/seed-1/run.json"
    rerun = json.loads(committed.read_text())
    rerun["metrics"][key] = value
    source = put(tmp_path / "grid", "digits/resnet20/sam/seed-1", rerun)
    before = snapshot(make_results.ROOT)
    with pytest.raises(
        SystemExit, match=re.escape(f"error: {source}: field metrics.{key} must be a finite number")
    ):
        run(make_results, "--collect", str(tmp_path / "grid"), "--replace")
    assert snapshot(make_results.ROOT) == before


@pytest.mark.parametrize(
    ("at", "problem"), [({"0.02": 0.04, "0.2": 15.5}, None), ({"0.2": "high"}, "sharpness_at")]
)
def test_a_record_with_the_worst_case_at_extra_radii_is_read_and_its_values_checked(tmp_path, at, problem):
    """The primary setting's records hold the worst case at more radii, {radius: number}: read as such (the
    check once refused every such record), a value that is not a number named."""
    record = json.loads((COMMITTED / "sam/seed-1/run.json").read_text())
    record["sharpness"] = {
        "sharpness": 0.18,
        "loss": 0.03,
        "sharpness_at": at,
        "settings": {"extra_radii": [0.2]},
    }
    path = put(tmp_path, "sam/seed-1", record)
    if problem is None:
        assert read_record(path)["sharpness"]["sharpness_at"] == at
    else:
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: field sharpness must be .*{problem}"):
            read_record(path)


def test_collect_says_which_committed_records_it_replaces_and_why(make_results, tmp_path, capsys):
    """Another code version's re-run of a committed run replaces it, saying so; one with other metrics needs
    --replace."""
    grid = tmp_path / "grid"
    committed = make_results.RESULTS / "digits/digits/resnet20/zsharp/seed-1/run.json"
    rerun = json.loads(committed.read_text())
    rerun["code"].update(dirty=True, source_sha256="e" * 64)
    rerun["environment"]["torch"] = "2.99.0"
    source = put(grid, "digits/resnet20/zsharp/seed-1", rerun)
    capsys.readouterr()
    run(make_results, "--collect", str(grid))
    out = capsys.readouterr().out
    assert (
        f"replacing 1 committed record(s):\n  {committed}: code.dirty, code.source_sha256, environment.torch"
        in out
    )
    assert json.loads(committed.read_text())["code"]["dirty"] is True

    rerun["metrics"]["test_accuracy"] -= 0.01
    put(grid, "digits/resnet20/zsharp/seed-1", rerun)
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit) as refused:
        run(make_results, "--collect", str(grid))
    assert str(refused.value) == (
        f"error: {source} would replace {committed}, whose metrics differ (test_accuracy)\n"
        "Pass --replace to replace them, or collect --into another folder."
    )
    assert snapshot(make_results.ROOT) == before
    run(make_results, "--collect", str(grid), "--replace")
    assert f"  {committed}: metrics\n" in capsys.readouterr().out
    assert json.loads(committed.read_text())["metrics"]["test_accuracy"] == rerun["metrics"]["test_accuracy"]


def test_check_names_stray_files_under_results(make_results):
    """Files that no setting's report makes and that are not records: a figure of an old setting, a note."""
    (make_results.RESULTS / "digits-old-methods.png").write_bytes(b"old")
    (make_results.RESULTS / "digits" / "notes.txt").write_text("a note")
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit) as failed:
        run(make_results, "--check")
    assert str(failed.value) == (
        "results/digits-old-methods.png, results/digits/notes.txt are neither run records nor made by a "
        "setting's report: remove them"
    )
    assert snapshot(make_results.ROOT) == before


@pytest.mark.parametrize("into", ["../elsewhere", "", "digits/deeper"])
def test_into_names_a_folder_under_results(make_results, tmp_path, into, capsys):
    before = snapshot(make_results.ROOT)
    with pytest.raises(SystemExit):
        run(make_results, "--collect", str(tmp_path / "grid"), "--into", into)
    assert "give the name of a folder under results/" in capsys.readouterr().err
    assert snapshot(make_results.ROOT) == before


def test_the_declared_tuned_radii_and_calibration_are_what_the_tuning_records_give():
    """TUNED_RHO and the 20-epoch loss-matched radius, declared in presets.py, are the picks the committed tuning
    records give (validation accuracy over seeds 100-102; the loss increase matched to ZSharp's)."""
    from hf_zsharp.reproduce import stats
    from hf_zsharp.reproduce.presets import LOSS_MATCHED_LONG, TUNED_RHO, VARIANTS
    from hf_zsharp.reproduce.records import finished_records

    records = finished_records(ROOT / "results" / "digits-long-tuning")
    rows = stats.summarize(stats.sweeps(records)["rho"])
    picks = {method: stats.chosen_by_validation(rows, method)["rho"] for method in TUNED_RHO}
    assert picks == TUNED_RHO
    assert {VARIANTS[f"{method}-tuned"].rho for method in TUNED_RHO} == set(TUNED_RHO.values())
    calibration = [r for r in records if r["method"] == "zsharp-random" or r["variant"] == "zsharp"]
    _, rho = stats.calibrated_rho(calibration, "zsharp", "zsharp-random")
    assert round(rho, 3) == VARIANTS[LOSS_MATCHED_LONG].rho
