"""scripts/make_results.py on a copy of some committed records: bad records named, --check writing nothing, and
--collect refusing to replace a record of another run."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from hf_zsharp.reproduce import report

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


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{garbage", "unreadable run record"),
        ("[1, 2]", "a run record is a JSON object, found a list"),
        ("NUMERIC", "field metrics.test_accuracy must be a number, found 'high'"),
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
    committed = make_results.RESULTS / "digits/digits/resnet20/sam/seed-0/run.json"
    smoke = json.loads(committed.read_text())
    smoke["command"] = smoke["command"].replace("--epochs 4", "--epochs 1")
    smoke["argv"][smoke["argv"].index("--num_train_epochs") + 1] = "1"
    smoke["metrics"]["test_accuracy"] = 0.1
    (grid / "digits/resnet20/sam/seed-0").mkdir(parents=True)
    (grid / "digits/resnet20/sam/seed-0/run.json").write_text(json.dumps(smoke))
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
    with pytest.raises(SystemExit, match=r"missing from the document: \['long-accuracy'"):
        run(make_results, "--collect", str(grid), "--into", "digits-long")
    assert make_results.DOCUMENT.read_text() == document
    assert not (make_results.RESULTS / "digits-long.csv").exists()

    names = report.results_blocks(make_results.RESULTS, tmp_path / "scratch")
    long_names = sorted(n for n in names if n.startswith("long-"))
    assert {"long-provenance", "long-accuracy", "long-sharpness", "long-mechanism"} <= set(long_names)
    make_results.DOCUMENT.write_text(
        document + "".join(f"<!-- generated:{n} -->\n<!-- /generated:{n} -->\n" for n in long_names)
    )
    run(make_results)
    assert (make_results.RESULTS / "digits-long.csv").exists()
    assert (make_results.RESULTS / "digits-long-methods.png").exists()
    text = make_results.DOCUMENT.read_text()
    assert "<!-- generated:long-accuracy -->\n| Method" in text
    run(make_results, "--check")
