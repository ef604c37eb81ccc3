"""`hf-zsharp-reproduce`: grid, presets, resume, statistics, table and figure, and end-to-end runs."""

import csv
import inspect
import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import ttest_rel

from hf_zsharp import reproduce
from hf_zsharp.optim import ASAM, FriendlySAM
from hf_zsharp.reproduce import (
    METHODS,
    PaperLRSchedule,
    RunSpec,
    SharpnessSettings,
    expand_grid,
    make_plan,
    paired_test,
    paper_lr_factor,
    summarize,
    table_markdown,
    write_results,
)
from hf_zsharp.run import parse_train_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(method, seed, final, best=None, curve=None, dataset="digits", model="resnet20", sharpness=None):
    """A hand-made `run.json` summary."""
    return {
        "dataset": dataset,
        "model": model,
        "method": method,
        "seed": seed,
        "final_accuracy": final,
        "best_accuracy": final if best is None else best,
        "epoch_accuracy": curve or [[1.0, final / 2], [2.0, final]],
        "wall_time_s": 10.0 + seed,
        "train_runtime_s": 8.0,
        "train_samples_per_second": 100.0,
        "sharpness": sharpness,
        "argv": [],
    }


def write_runs(root: Path, runs) -> None:
    for run in runs:
        folder = RunSpec(run["dataset"], run["model"], run["method"], run["seed"]).folder(root)
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(run))


# ---------------------------------------------------------------------------------------------------------
# Grid and presets


def test_grid_order_and_folders(tmp_path):
    specs = expand_grid(["uoft-cs/cifar10"], ["resnet56", "vgg16"], ["sam", "zsharp"], [0, 1])
    assert len(specs) == 8
    # Per model, seed by seed, every method of a seed in turn.
    assert [(s.model, s.seed, s.method) for s in specs[:4]] == [
        ("resnet56", 0, "sam"),
        ("resnet56", 0, "zsharp"),
        ("resnet56", 1, "sam"),
        ("resnet56", 1, "zsharp"),
    ]
    assert specs[0].folder(tmp_path) == tmp_path / "cifar10" / "resnet56" / "sam" / "seed-0"
    with pytest.raises(ValueError, match="share the folder name 'cifar10'"):
        expand_grid(["uoft-cs/cifar10", "/data/cifar10"], ["resnet56"], ["sam"], [0])


def test_digits_preset_is_the_full_grid(tmp_path):
    plan, _ = make_plan(["--output_dir", str(tmp_path)])
    assert plan.preset.datasets == ("digits",)
    assert {s.method for s in plan.specs} == set(METHODS)
    assert len(plan.specs) == 7 * 3
    model_args, data_args, training_args = parse_train_args(plan.flags(plan.specs[0]))
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("resnet20", "digits")
    assert training_args.output_dir == str(plan.specs[0].folder(tmp_path))


def test_narrowing_and_pass_through(tmp_path):
    plan, _ = make_plan(
        [
            "paper-cifar100",
            "--methods", "sam,zsharp-random",
            "--models", "resnet56",
            "--seeds", "0,5",
            "--epochs", "3",
            "--output_dir", str(tmp_path),
            "--max_train_samples", "64",
        ]
    )  # fmt: skip
    assert [(s.method, s.seed) for s in plan.specs] == [
        ("sam", 0),
        ("zsharp-random", 0),
        ("sam", 5),
        ("zsharp-random", 5),
    ]
    model_args, data_args, args = parse_train_args(plan.flags(plan.specs[3]))
    assert data_args.dataset_name == "uoft-cs/cifar100"
    assert data_args.max_train_samples == 64
    assert (args.num_train_epochs, args.seed) == (3, 5)
    assert (args.sam, args.sam_mask, args.zsharp_percentile, args.sam_rho) == ("zsharp", "random", 0.95, 0.05)
    plan, _ = make_plan(["digits", "--seeds", "2", "--output_dir", str(tmp_path)])
    assert sorted({s.seed for s in plan.specs}) == [0, 1]


@pytest.mark.parametrize("preset", ["paper-cifar10", "paper-cifar100", "paper-tinyimagenet"])
def test_paper_presets_follow_the_recipe(tmp_path, preset):
    plan, _ = make_plan([preset, "--output_dir", str(tmp_path)])
    assert len(plan.specs) == 7 * 4 * 3
    model_args, _, args = parse_train_args(plan.flags(plan.specs[0]))
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (
        1e-3,
        0.9,
        0.999,
        1e-8,
    )
    assert (args.weight_decay, args.per_device_train_batch_size, args.num_train_epochs) == (5e-5, 256, 200)
    assert not (args.fp16 or args.bf16)
    assert model_args.image_size == (64 if preset == "paper-tinyimagenet" else 32)
    hooks = reproduce.paper_trainer_hooks(args)
    adam, kwargs = hooks["optimizer_cls_and_kwargs"]
    assert adam is torch.optim.Adam and kwargs == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}


def test_method_hyperparameters():
    expected = {
        "none": ("none", None, "zscore"),
        "sam": ("sam", 0.05, "zscore"),
        "asam": ("asam", 0.5, "zscore"),
        "fsam": ("fsam", 0.05, "zscore"),
        "zsharp": ("zsharp", 0.05, "zscore"),
        "zsharp-random": ("zsharp", 0.05, "random"),
        "zsharp-magnitude": ("zsharp", 0.05, "magnitude"),
    }
    for method, (sam, rho, mask) in expected.items():
        flags = [*METHODS[method], "--output_dir", "unused"]
        _, _, args = parse_train_args(flags)
        assert (args.sam, args.sam_rho, args.sam_mask, args.zsharp_percentile) == (sam, rho, mask, 0.95)
    # The paper's ASAM eta and Friendly-SAM sigma/lambda are those optimizers' defaults.
    assert inspect.signature(ASAM).parameters["eta"].default == 0.01
    friendly = inspect.signature(FriendlySAM).parameters
    assert (friendly["sigma"].default, friendly["lmbda"].default) == (1.0, 0.9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "sam,zsharpp"], "Unknown method.*zsharpp"),
        (["--models", "resnet57"], "Unknown model 'resnet57'"),
        (["--datasets", "./no/such/folder"], "Unknown dataset"),
        (["--num_train_epochs", "3"], "use --epochs"),
        (["--seed=4"], "use --seeds"),
        (["--sam_mask", "random"], "use --methods"),
        (["--no_such_flag", "1"], "no_such_flag"),
        (["--seeds", "2", "paper-cifar10"], "Name the preset first"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        make_plan(["digits", "--output_dir", str(tmp_path), *argv])
    with pytest.raises(ValueError, match=message):  # the preset is optional
        make_plan([*argv, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "argv", [["--seeds", "0"], ["--seeds", "1,1"], ["--seeds", "a"], ["--epochs", "0"], ["cifar"]]
)
def test_bad_options_exit_with_usage(tmp_path, argv):
    with pytest.raises(SystemExit):
        make_plan([*argv, "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------
# The paper's schedule


def test_paper_lr_factor():
    steps = 10  # per epoch
    assert paper_lr_factor(0, steps) == pytest.approx(1 / 50)
    assert paper_lr_factor(49, steps) == 1.0
    assert paper_lr_factor(50, steps) == 1.0  # warm-up done: StepLR counts from here
    assert paper_lr_factor(50 + 30 * steps - 1, steps) == 1.0
    assert paper_lr_factor(50 + 30 * steps, steps) == 0.75
    assert paper_lr_factor(50 + 60 * steps, steps) == pytest.approx(0.75**2)


def test_paper_lr_schedule_callback_reshapes_the_constant_schedule():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # Trainer's "constant"
    args = SimpleNamespace(gradient_accumulation_steps=2)
    PaperLRSchedule().on_train_begin(args, None, None, lr_scheduler=scheduler, train_dataloader=range(7))
    steps_per_epoch = 4  # ceil(7 batches / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / (5 * steps_per_epoch))
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]  # what Trainer logs
    lrs = []
    for _ in range(40 * steps_per_epoch):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[5 * steps_per_epoch - 2] == pytest.approx(1e-3)
    assert lrs[35 * steps_per_epoch - 2] == pytest.approx(1e-3)
    assert lrs[35 * steps_per_epoch - 1] == pytest.approx(0.75e-3)
    with pytest.raises(ValueError, match="constant"):
        PaperLRSchedule().on_train_begin(
            args, None, None, lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), train_dataloader=[1]
        )


# ---------------------------------------------------------------------------------------------------------
# Statistics, table, figure


def test_statistics_on_hand_made_runs():
    sam = [0.90, 0.92, 0.91]
    zsharp = [0.92, 0.93, 0.915]
    runs = [summary("sam", s, a) for s, a in enumerate(sam)]
    runs += [summary("zsharp", s, a, best=a + 0.01) for s, a in enumerate(zsharp)]
    runs += [summary("none", 0, 0.80)]
    rows = {row["method"]: row for row in summarize(runs)}
    assert list(rows) == ["none", "sam", "zsharp"]  # the methods' order, not the runs'
    z = rows["zsharp"]
    assert z["seeds"] == 3
    assert z["final_accuracy_mean"] == pytest.approx(sum(zsharp) / 3)
    assert z["final_accuracy_std"] == pytest.approx(torch.tensor(zsharp, dtype=torch.float64).std().item())
    assert z["best_accuracy_mean"] == pytest.approx(sum(zsharp) / 3 + 0.01)
    assert z["delta_vs_sam"] == pytest.approx((sum(zsharp) - sum(sam)) / 3)
    assert z["p_vs_sam"] == pytest.approx(ttest_rel(zsharp, sam).pvalue)
    assert z["pairs_vs_sam"] == 3
    assert z["wall_time_s"] == pytest.approx(11.0)
    assert rows["sam"]["delta_vs_sam"] is None and rows["sam"]["p_vs_sam"] is None
    # One seed: no std, a difference but no test.
    assert rows["none"]["final_accuracy_std"] is None
    assert rows["none"]["delta_vs_sam"] == pytest.approx(0.80 - 0.90)
    assert rows["none"]["p_vs_sam"] is None and rows["none"]["pairs_vs_sam"] == 1
    assert rows["none"]["sharpness_mean"] is None


def test_paired_test_pairs_by_seed():
    delta, p, pairs = paired_test({0: 0.5, 1: 0.6, 7: 0.9}, {1: 0.55, 0: 0.45, 3: 0.1})
    assert pairs == 2 and delta == pytest.approx(0.05)
    assert p is None  # identical differences: the t statistic is undefined
    assert paired_test({0: 0.5}, {}) == (None, None, 0)


def test_table_csv_and_figure(tmp_path):
    curve = [[1.0, 0.5], [2.0, 0.8], [3.0, 0.85]]
    sharp = {"sharpness": 0.02, "hessian_max_eig": 30.0, "loss": 0.1, "seconds": 1.0}
    runs = [
        summary(m, s, 0.8 + 0.01 * s + 0.02 * i, curve=curve, sharpness=sharp)
        for i, m in enumerate(METHODS)
        for s in (0, 1)
    ]
    runs.append(summary("sam", 0, 0.6, dataset="uoft-cs/cifar10", model="vgg16"))
    write_runs(tmp_path, runs)
    (tmp_path / "digits" / "resnet20" / "sam" / "seed-9").mkdir()  # an unfinished run: left out
    paths = write_results(tmp_path, command="hf-zsharp-reproduce digits")

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == len(METHODS) + 1
    zsharp = next(r for r in rows if r["method"] == "zsharp" and r["dataset"] == "digits")
    assert float(zsharp["final_accuracy_mean"]) == pytest.approx(0.805 + 0.08)
    assert float(zsharp["delta_vs_sam"]) == pytest.approx(0.06)
    assert zsharp["p_vs_sam"] == ""  # equal differences over the seeds: undefined
    assert float(zsharp["sharpness_mean"]) == pytest.approx(0.02)
    assert next(r for r in rows if r["model"] == "vgg16")["final_accuracy_std"] == ""

    markdown = paths["markdown"].read_text()
    assert "Command: `hf-zsharp-reproduce digits`" in markdown
    assert "| digits | resnet20 | zsharp | 2 | 88.50 ± 0.71 | 88.50 ± 0.71 | +6.00 | n/a |" in markdown
    assert "| cifar10 | vgg16 | sam | 1 | 60.00 | 60.00 | — | — |" in markdown
    assert "Sharpness" in markdown and "![results](results.png)" in markdown
    figure = paths["figure"].read_bytes()
    assert figure.startswith(PNG_MAGIC) and len(figure) < 300_000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_markdown_without_sharpness_has_no_sharpness_columns():
    markdown = table_markdown(summarize([summary("sam", 0, 0.9), summary("zsharp", 0, 0.91)]))
    assert "Sharpness" not in markdown
    assert "| digits | resnet20 | zsharp | 1 | 91.00 | 91.00 | +1.00 | n/a |" in markdown


# ---------------------------------------------------------------------------------------------------------
# Resume


@pytest.fixture
def fake_training(monkeypatch):
    """Replace `run_training` by a recorder that writes nothing but the folder and returns fixed metrics.

    The figure is replaced too (drawn in test_table_csv_and_figure): `calls.figures` counts its rewrites.
    """
    calls = []
    figures = []
    monkeypatch.setattr(reproduce, "plot_results", lambda runs, path: figures.append(len(runs)))

    def fake_run_training(model_args, data_args, training_args, **hooks):
        calls.append((training_args.output_dir, training_args.overwrite_output_dir, hooks))
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        accuracy = 0.5 + 0.1 * training_args.seed + (0.05 if training_args.sam == "zsharp" else 0.0)
        return SimpleNamespace(
            metrics={"eval_accuracy": accuracy, "train_runtime": 1.0, "train_samples_per_second": 50.0},
            trainer=SimpleNamespace(is_world_process_zero=lambda: True),
            log_history=[
                {"epoch": 1.0, "eval_accuracy": accuracy},
                {"epoch": 1.0, "eval_accuracy": accuracy},
            ],
        )

    monkeypatch.setattr(reproduce, "run_training", fake_run_training)
    return SimpleNamespace(runs=calls, figures=figures)


def test_finished_runs_are_skipped_and_unfinished_ones_rerun(tmp_path, fake_training, capsys):
    argv = ["digits", "--methods", "sam,zsharp", "--seeds", "2", "--output_dir", str(tmp_path)]
    reproduce.main(argv)
    assert len(fake_training.runs) == 4
    assert all(overwrite for _, overwrite, _ in fake_training.runs)
    assert fake_training.figures == [1, 2, 3, 4, 4]  # rewritten after every run, and at the end
    out = capsys.readouterr().out
    assert "[1/4] digits resnet20 sam seed 0" in out and "ETA" in out
    saved = json.loads((tmp_path / "digits/resnet20/zsharp/seed-1/run.json").read_text())
    assert saved["final_accuracy"] == pytest.approx(0.65)
    assert saved["epoch_accuracy"] == [[1.0, 0.65]]
    assert saved["sharpness"] is None and saved["environment"]["torch"] == torch.__version__

    fake_training.runs.clear()
    reproduce.main(argv)
    assert fake_training.runs == []  # everything finished: nothing repeated

    (tmp_path / "digits/resnet20/sam/seed-1/run.json").unlink()  # as if it crashed in that run
    reproduce.main([*argv[:-2], "--seeds", "3", "--output_dir", str(tmp_path)])
    rerun = [Path(folder).relative_to(tmp_path).as_posix() for folder, _, _ in fake_training.runs]
    assert rerun == [
        "digits/resnet20/sam/seed-1",
        "digits/resnet20/sam/seed-2",
        "digits/resnet20/zsharp/seed-2",
    ]
    table = (tmp_path / "results.md").read_text()
    assert "| digits | resnet20 | zsharp | 3 |" in table


def test_a_finished_run_with_other_flags_is_refused(tmp_path, fake_training):
    reproduce.main(["digits", "--methods", "sam", "--seeds", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds a finished run trained with other flags"):
        reproduce.main(
            ["digits", "--methods", "sam", "--seeds", "1", "--epochs", "9", "--output_dir", str(tmp_path)]
        )
    assert len(fake_training.runs) == 1


def test_results_cover_every_grid_written_to_the_folder(tmp_path, fake_training):
    reproduce.main(["digits", "--methods", "sam", "--seeds", "2", "--output_dir", str(tmp_path)])
    reproduce.main(
        ["digits", "--methods", "zsharp", "--seeds", "2", "--output_dir", str(tmp_path), "--dry_run"]
    )
    assert len(fake_training.runs) == 2
    reproduce.main(["digits", "--methods", "zsharp", "--seeds", "2", "--output_dir", str(tmp_path)])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [r["method"] for r in rows] == ["sam", "zsharp"]
    assert float(rows[1]["delta_vs_sam"]) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------------------
# End to end, through the real training code


@pytest.mark.slow
def test_digits_end_to_end(tmp_path, monkeypatch):
    quick = SharpnessSettings(batches=1, batch_size=8, ascent_steps=2, power_iters=2)
    monkeypatch.setitem(reproduce.PRESETS, "digits", replace(reproduce.PRESETS["digits"], sharpness=quick))
    out = tmp_path / "out"
    reproduce.main(
        [
            "digits",
            "--methods", "none,zsharp",
            "--seeds", "2",
            "--epochs", "1",
            "--output_dir", str(out),
            "--max_train_samples", "64",
            "--max_eval_samples", "64",
            "--per_device_train_batch_size", "32",
            "--measure_sharpness",
        ]
    )  # fmt: skip
    runs = sorted(out.glob("digits/resnet20/*/seed-*/run.json"))
    assert len(runs) == 4
    run = json.loads(runs[-1].read_text())
    assert 0.0 <= run["final_accuracy"] <= 1.0 and run["epoch_accuracy"][0][0] == 1.0
    assert run["train_samples_per_second"] > 0
    assert run["sharpness"]["sharpness"] >= 0 and run["sharpness"]["hessian_max_eig"] != 0
    assert (runs[-1].parent / "model.safetensors").is_file()
    table = (out / "results.md").read_text()
    assert "| digits | resnet20 | zsharp | 2 |" in table and "Hessian" in table
    assert (out / "results.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_paper_preset_on_a_cifar10_schema_dataset(tmp_path, cifar10_dir, monkeypatch):
    trainers = []
    real_run_training = reproduce.run_training

    def recording_run_training(*args, **kwargs):
        result = real_run_training(*args, **kwargs)
        trainers.append(result.trainer)
        return result

    monkeypatch.setattr(reproduce, "run_training", recording_run_training)
    out = tmp_path / "out"
    reproduce.main(
        [
            "paper-cifar10",
            "--datasets", str(cifar10_dir),
            "--models", "resnet56",
            "--methods", "none,zsharp",
            "--seeds", "1",
            "--epochs", "1",
            "--output_dir", str(out),
            "--dataloader_num_workers", "0",
        ]
    )  # fmt: skip
    assert len(list(out.glob("cifar10/resnet56/*/seed-0/run.json"))) == 2
    for trainer in trainers:
        optimizer = trainer.optimizer
        while not isinstance(optimizer, torch.optim.Adam) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        base = getattr(optimizer, "base_optimizer", optimizer)
        assert type(base) is torch.optim.Adam  # coupled L2, not AdamW
        assert max(group["weight_decay"] for group in base.param_groups) == 5e-5
        assert trainer.args.per_device_train_batch_size == 256
        # One step per epoch (40 images, batch 256), 5 warm-up epochs: the only step ran at 1/5 of the rate.
        logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
        assert logged == [pytest.approx(1e-3 / 5)]
