"""Running the grid: resume and refusal (with a stand-in for training), one real tiny grid end to end, and the
re-run of a committed record's command from an empty folder, which must give the same accuracy exactly (on a CPU
of the same identity; on another, the command must at least be deterministic)."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hf_zsharp.reproduce import cli, lock, report
from hf_zsharp.reproduce.presets import PRESETS, SharpnessSettings

ROOT = Path(__file__).resolve().parents[1]
SMOKE_RECORD = ROOT / "results" / "smoke" / "digits" / "resnet20" / "zsharp" / "seed-0" / "run.json"


@pytest.fixture
def fake_training(monkeypatch):
    """`train_one` replaced by a recorder returning a minimal record; figures are not drawn (tested elsewhere)."""
    calls = []
    monkeypatch.setattr(report.figures, "plot_methods", lambda rows, records, title, path: Path(path))
    monkeypatch.setattr(report.figures, "plot_sweep", lambda rows, swept, title, path: Path(path))

    def fake_train_one(plan, spec):
        calls.append(spec)
        accuracy = 0.5 + 0.1 * spec.seed + (0.05 if spec.method == "zsharp" else 0.0)
        return {
            "command": plan.command(spec),
            "argv": plan.flags(spec),
            "dataset": spec.dataset,
            "model": spec.model,
            "method": spec.method,
            "variant": spec.variant,
            "seed": spec.seed,
            "rho": spec.effective_rho,
            "sam_rho": spec.effective_rho,
            "percentile": spec.effective_percentile,
            "metrics": {
                "test_accuracy": accuracy,
                "test_accuracy_at_best_val": accuracy,
                "val_accuracy": accuracy,
            },
            "history": [{"epoch": 1.0, "eval_accuracy": accuracy}],
            "sharpness": None,
            "timing": {"wall_time_s": 1.0, "train_samples_per_second": 50.0},
            "code": {"commit": None, "dirty": None, "source_sha256": "0" * 64},
            "environment": {"device": "CPU", "threads": "1"},
        }

    monkeypatch.setattr(cli, "train_one", fake_train_one)
    return calls


def test_finished_runs_are_skipped_and_unfinished_ones_rerun(tmp_path, fake_training, capsys):
    argv = ["digits", "--methods", "sam,zsharp", "--seeds", "2", "--output_dir", str(tmp_path)]
    cli.main(argv)
    assert len(fake_training) == 4
    out = capsys.readouterr().out
    assert "[1/4] digits resnet20 sam seed 0" in out and "ETA" in out
    saved = json.loads((tmp_path / "digits/resnet20/zsharp/seed-1/run.json").read_text())
    assert saved["metrics"]["test_accuracy"] == pytest.approx(0.65)

    fake_training.clear()
    cli.main(argv)
    assert fake_training == []  # everything finished: nothing repeated

    (tmp_path / "digits/resnet20/sam/seed-1/run.json").unlink()  # as if it crashed in that run
    cli.main([*argv[:-2], "--seeds", "3", "--rho", "0.05,0.1", "--output_dir", str(tmp_path)])
    assert [spec.folder(tmp_path).relative_to(tmp_path).as_posix() for spec in fake_training] == [
        "digits/resnet20/sam_rho0.1/seed-0",
        "digits/resnet20/zsharp_rho0.1/seed-0",
        "digits/resnet20/sam/seed-1",
        "digits/resnet20/sam_rho0.1/seed-1",
        "digits/resnet20/zsharp_rho0.1/seed-1",
        "digits/resnet20/sam/seed-2",
        "digits/resnet20/sam_rho0.1/seed-2",
        "digits/resnet20/zsharp/seed-2",
        "digits/resnet20/zsharp_rho0.1/seed-2",
    ]
    table = (tmp_path / "results.md").read_text()
    assert "| zsharp | 0.05 | 3 |" in table and "| sam (chosen by val.) | 0.05 | — | 3 |" in table


def test_a_finished_run_made_by_another_command_is_refused(tmp_path, fake_training):
    cli.main(["digits", "--methods", "sam", "--seeds", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="made by another command"):
        cli.main(
            ["digits", "--methods", "sam", "--seeds", "1", "--epochs", "9", "--output_dir", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="made by another command"):
        cli.main(
            ["digits", "--methods", "sam", "--seeds", "1", "--threads", "2", "--output_dir", str(tmp_path)]
        )
    assert len(fake_training) == 1


def test_a_moved_grid_resumes(tmp_path, fake_training):
    argv = ["digits", "--methods", "sam", "--seeds", "2"]
    cli.main([*argv, "--output_dir", str(tmp_path / "first")])
    (tmp_path / "first").rename(tmp_path / "moved")
    fake_training.clear()
    # The records name the old folder; they are still the same runs.
    cli.main([*argv, "--output_dir", str(tmp_path / "moved")])
    assert fake_training == []


def test_a_run_locked_by_another_process_is_skipped(tmp_path, fake_training, capsys):
    """Still locked when the grid has run the rest: the grid ends with an error naming it."""
    argv = ["digits", "--methods", "sam", "--seeds", "2", "--output_dir", str(tmp_path)]
    folder = tmp_path / "digits/resnet20/sam/seed-0"
    with lock.run_lock(folder) as held:  # another open file description: as another process holds it
        assert held
        with pytest.raises(SystemExit) as unfinished:
            cli.main(argv)
    assert str(unfinished.value) == (
        f"error: 1 run(s) unfinished, locked by another process: {folder}; run the command again when it has "
        "ended (the results leave them out)"
    )
    assert [spec.seed for spec in fake_training] == [1]
    assert (
        f"skipped: another process is running it ({folder / lock.LOCK} is locked)" in capsys.readouterr().out
    )
    assert not (folder / "run.json").exists()
    fake_training.clear()
    cli.main(argv)  # the lock is gone with its holder: the run is trained now
    assert [spec.seed for spec in fake_training] == [0]


# Another process taking a run's lock as `lock.run_lock` does, holding it until its stdin closes.
HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_run_whose_lock_holder_exits_is_run_at_the_end(tmp_path, fake_training, monkeypatch, capsys):
    """Another process holds seed 0's lock when the grid reaches it, and exits (without a record) while seed 1
    trains: the grid comes back to seed 0 at its end."""
    folder = tmp_path / "digits/resnet20/sam/seed-0"
    folder.mkdir(parents=True)
    command = [sys.executable, "-c", HOLD_LOCK, str(folder / lock.LOCK)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "held\n"
        train = cli.train_one

        def holder_exits_then_train(plan, spec):
            if holder.poll() is None:
                holder.stdin.close()  # the holder exits: the kernel releases its lock
                holder.wait(timeout=60)
            return train(plan, spec)

        monkeypatch.setattr(cli, "train_one", holder_exits_then_train)
        cli.main(["digits", "--methods", "sam", "--seeds", "2", "--output_dir", str(tmp_path)])
    assert [spec.seed for spec in fake_training] == [1, 0]
    out = capsys.readouterr().out
    assert "is locked); tried again at the end" in out and "Retrying 1 run(s) skipped for their lock" in out
    assert (folder / "run.json").exists()


def test_runs_of_another_length_are_not_pooled_into_one_row(tmp_path, fake_training):
    """`--epochs 1` then `--epochs 3` into one folder, on other seeds: the second grid is refused before it
    trains, naming the record; a record that gets in anyway stops the grid's report."""
    base = ["digits", "--methods", "sam", "--output_dir", str(tmp_path)]
    cli.main([*base, "--seeds", "0,", "--epochs", "1"])
    first = tmp_path / "digits/resnet20/sam/seed-0/run.json"
    with pytest.raises(SystemExit) as refused:
        cli.main([*base, "--seeds", "1,", "--epochs", "3"])
    assert str(refused.value) == (
        f"error: {tmp_path / 'digits/resnet20/sam/seed-1'} (to run) cannot be pooled with {first} "
        "(digits/resnet20 sam): epochs 3, not 1; use another --output_dir"
    )
    assert [spec.seed for spec in fake_training] == [0]

    other = json.loads(first.read_text())
    other["command"] = other["command"].replace("--seeds 0, --epochs 1", "--seeds 1, --epochs 3")
    other["argv"][other["argv"].index("--num_train_epochs") + 1] = "3"
    other["seed"] = 1
    second = tmp_path / "digits/resnet20/sam/seed-1/run.json"
    second.parent.mkdir(parents=True)
    second.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=re.escape(f"{second} cannot be pooled with {first}")):
        report.write_results(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(f"error: {second} cannot be pooled with {first}")):
        cli.main([*base, "--seeds", "0,", "--epochs", "1"])


def test_an_unreadable_record_in_the_grid_is_named_not_overwritten(tmp_path, fake_training):
    argv = ["digits", "--methods", "sam", "--seeds", "1", "--output_dir", str(tmp_path)]
    record = tmp_path / "digits/resnet20/sam/seed-0/run.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    with pytest.raises(SystemExit, match=f"{record}: unreadable run record"):
        cli.main(argv)
    assert record.read_text() == "{not json" and fake_training == []


@pytest.fixture
def restore_process_settings():
    """The grid fixes torch's threads and turns on deterministic algorithms (and their environment variables)
    for the whole process: put them back for the tests that run after."""
    threads, deterministic, environ = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        dict(os.environ),
    )
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.slow
def test_a_tiny_digits_grid_end_to_end(tmp_path, monkeypatch, restore_process_settings):
    quick = SharpnessSettings(batches=2, batch_size=16, ascent_steps=2, lanczos_iters=3, extra_radii=(0.2,))
    monkeypatch.setitem(PRESETS, "digits", replace(PRESETS["digits"], sharpness=quick))
    out = tmp_path / "out"
    cli.main(
        [
            "digits", "--methods", "none,sam-matched", "--seeds", "1", "--epochs", "1", "--output_dir", str(out),
            "--max_train_samples", "64", "--max_eval_samples", "32", "--measure_sharpness",
        ]
    )  # fmt: skip
    plain = json.loads((out / "digits/resnet20/none/seed-0/run.json").read_text())
    matched = json.loads((out / "digits/resnet20/sam-matched/seed-0/run.json").read_text())
    assert matched["command"] == (
        "hf-zsharp-reproduce digits --datasets digits --models resnet20 --methods sam-matched --seeds 0, "
        "--epochs 1 --threads 1 --measure_sharpness --max_train_samples 64 --max_eval_samples 32"
    )
    # ResNet-20 has L = 20 tensors with ndim > 1: SAM's radius becomes 0.05 sqrt(20), ZSharp's total norm.
    assert matched["filtered_tensors"] == 20
    assert matched["sam_rho"] == pytest.approx(0.05 * math.sqrt(20), rel=1e-12)
    (epoch,) = matched["history"]
    assert epoch["sam_perturbation_norm"] == pytest.approx(matched["sam_rho"], rel=1e-5)
    assert "sam_loss_increase" in epoch and "sam_loss_increase" not in plain["history"][0]
    metrics = matched["metrics"]
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["best_val_epoch"] == 1.0
    assert metrics["test_accuracy_at_best_val"] == metrics["test_accuracy"]  # one epoch: the same weights
    sharpness = matched["sharpness"]
    assert (
        sharpness["images"] == 32
        and sharpness["sharpness"] >= 0
        and sharpness["scale_invariant_sharpness"] >= 0
    )
    assert sharpness["hessian_min_eig"] < sharpness["hessian_max_eig"]
    assert sharpness["sharpness_at"]["0.2"] >= 0  # and the grid's report read it back
    assert matched["hyperparameters"]["training"]["seed"] == 0 and matched["environment"]["threads"] == "1"
    assert len(matched["code"]["source_sha256"]) == 64
    assert "| sam-matched | 0.224 | 1 |" in (out / "results.md").read_text()


def recreate(record: dict, folder: Path) -> dict:
    """Run a record's command from the empty `folder`, as a user would, and return the record it writes."""
    words = shlex.split(record["command"])
    assert words[0] == "hf-zsharp-reproduce"
    script = "import sys; from hf_zsharp.cli import reproduce_main; reproduce_main(sys.argv[1:])"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))
    }  # the command sets threads
    folder.mkdir()
    subprocess.run(
        [sys.executable, "-c", script, *words[1:]], cwd=folder, env=env, check=True, capture_output=True
    )
    return json.loads((folder / "reproduce-digits" / record["folder"] / "run.json").read_text())


@pytest.mark.slow
def test_a_committed_record_is_recreated_exactly_by_its_command(tmp_path):
    """Bit-identical results are only promised on CPUs with the same vector code paths (the record's `cpu`):
    another CPU's kernels round differently, and two epochs of training turn that into other weights. There the
    test checks what the promise rests on: the command run twice gives the same accuracy exactly."""
    committed = json.loads(SMOKE_RECORD.read_text())
    recreated = recreate(committed, tmp_path / "first")
    assert recreated["command"] == committed["command"] and recreated["argv"] == committed["argv"]
    if recreated["environment"]["cpu"] != committed["environment"]["cpu"]:
        committed = recreate(committed, tmp_path / "second")
    for key in ("test_accuracy", "val_accuracy", "test_loss"):
        assert recreated["metrics"][key] == committed["metrics"][key]


def test_results_md_is_what_the_committed_records_give(tmp_path):
    """RESULTS.md's generated blocks are regenerated from the records under results/ (figures into a temporary
    folder)."""
    document = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    blocks = report.results_blocks(ROOT / "results", tmp_path)
    assert report.update_blocks(document, blocks) == document, "run scripts/make_results.py"
