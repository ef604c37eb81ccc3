"""`hf-zsharp-reproduce`'s grid: presets, methods and their flags, sweep axes, commands, bad input, the paper's
schedule. Nothing here trains."""

import inspect
import shlex

import pytest
import torch

from hf_zsharp.args import parse_train_args
from hf_zsharp.optim import ASAM, FriendlySAM
from hf_zsharp.reproduce.args import ReproduceArguments
from hf_zsharp.reproduce.cli import make_plan
from hf_zsharp.reproduce.grid import RunSpec, expand_grid
from hf_zsharp.reproduce.presets import (
    COMPARED_AT_4_EPOCHS,
    COMPARED_AT_20_EPOCHS,
    COMPARED_UNCALIBRATED,
    PRESETS,
    VARIANTS,
)
from hf_zsharp.reproduce.recipe import (
    PaperRecipeTrainer,
    paper_lr_factor,
    paper_lr_scheduler,
    paper_trainer_hooks,
)


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


def test_sweep_axes_apply_where_they_mean_something():
    specs = expand_grid(
        ["digits"], ["resnet20"], ["none", "sam", "zsharp", "sam-layerwise"], [0], [0.01, 0.05], [0.9, 0.95]
    )
    assert [s.variant for s in specs] == [
        "none",  # no ascent: one run, whatever the radii
        "sam_rho0.01",
        "sam",  # the method's own rho is stored as the default: the same folder as the plain grid's
        "zsharp_rho0.01_q0.9",
        "zsharp_rho0.01",
        "zsharp_q0.9",
        "zsharp",
        "sam-layerwise_rho0.01",  # no filter: the percentile axis does not apply
        "sam-layerwise",
    ]
    assert RunSpec("digits", "resnet20", "zsharp", 0, 0.01, 0.9).effective_percentile == 0.9
    assert RunSpec("digits", "resnet20", "asam", 0).effective_rho == 0.5


def test_digits_preset_is_the_full_grid_with_ten_seeds(tmp_path):
    plan, _ = make_plan(["--output_dir", str(tmp_path)])
    assert plan.preset.datasets == ("digits",)
    assert {s.method for s in plan.specs} == set(COMPARED_AT_4_EPOCHS)
    assert len(plan.specs) == len(COMPARED_AT_4_EPOCHS) * 10 and plan.threads == 1
    model_args, data_args, training_args = parse_train_args(plan.flags(plan.specs[0]))
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("resnet20", "digits")
    assert data_args.train_val_split == 0.2  # model selection on data held out of the training split
    assert training_args.full_determinism and training_args.use_cpu
    assert training_args.output_dir == str(plan.specs[0].folder(tmp_path))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("none", ("none", None, "zscore", "tensor")),
        ("sam", ("sam", 0.05, "zscore", "tensor")),
        ("asam", ("asam", 0.5, "zscore", "tensor")),
        ("fsam", ("fsam", 0.05, "zscore", "tensor")),
        ("zsharp", ("zsharp", 0.05, "zscore", "tensor")),
        ("zsharp-random", ("zsharp", 0.05, "random", "tensor")),
        ("zsharp-magnitude", ("zsharp", 0.05, "magnitude", "tensor")),
        ("sam-layerwise", ("zsharp", 0.05, "none", "tensor")),
        ("sam-matched", ("sam", 0.05, "zscore", "tensor")),  # scaled by sqrt(L) once the model exists
        ("zsharp-global", ("zsharp", 0.05, "zscore", "global")),
    ],
)
def test_method_hyperparameters(tmp_path, method, expected):
    plan, _ = make_plan(["--methods", method, "--seeds", "1", "--output_dir", str(tmp_path)])
    _, _, args = parse_train_args(plan.flags(plan.specs[0]))
    assert (args.sam, args.sam_rho, args.sam_mask, args.sam_radius) == expected
    assert args.zsharp_percentile == 0.95
    assert VARIANTS[method].matched == (method == "sam-matched")


def test_paper_baselines_use_the_optimizers_defaults():
    # The paper's ASAM eta and Friendly-SAM sigma/lambda are those optimizers' defaults.
    assert inspect.signature(ASAM).parameters["eta"].default == 0.01
    friendly = inspect.signature(FriendlySAM).parameters
    assert (friendly["sigma"].default, friendly["lmbda"].default) == (1.0, 0.9)


def test_sweep_flags_and_the_command_that_recreates_one_run(tmp_path):
    argv = ["digits", "--methods", "sam,zsharp", "--rho", "0.1", "--percentile", "0.9", "--seeds", "3,"]
    plan, _ = make_plan([*argv, "--epochs", "2", "--output_dir", str(tmp_path), "--max_train_samples", "64"])
    zsharp = next(s for s in plan.specs if s.method == "zsharp")
    _, data_args, args = parse_train_args(plan.flags(zsharp))
    assert (args.sam_rho, args.zsharp_percentile, args.seed, args.num_train_epochs) == (0.1, 0.9, 3, 2)
    assert data_args.max_train_samples == 64
    command = plan.command(zsharp)
    assert command == (
        "hf-zsharp-reproduce digits --datasets digits --models resnet20 --methods zsharp --seeds 3, --epochs 2 "
        "--rho 0.1 --percentile 0.9 --threads 1 --max_train_samples 64"
    )
    # The command names exactly this run, with relative paths (the default output folder).
    again, _ = make_plan(shlex.split(command)[1:])
    assert again.specs == [zsharp]
    assert again.flags(zsharp)[-1] == "reproduce-digits/digits/resnet20/zsharp_rho0.1_q0.9/seed-3"


def test_narrowing_a_paper_preset(tmp_path):
    plan, _ = make_plan(
        [
            "paper-cifar100",
            "--methods", "sam,zsharp-random",
            "--models", "resnet56",
            "--seeds", "0,5",
            "--epochs", "3",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [(s.method, s.seed) for s in plan.specs] == [
        ("sam", 0),
        ("zsharp-random", 0),
        ("sam", 5),
        ("zsharp-random", 5),
    ]
    _, data_args, args = parse_train_args(plan.flags(plan.specs[3]))
    assert data_args.dataset_name == "uoft-cs/cifar100" and data_args.train_val_split == 0.1
    assert (args.num_train_epochs, args.seed, args.sam_mask) == (3, 5, "random")


@pytest.mark.parametrize("preset", ["paper-cifar10", "paper-cifar100", "paper-tinyimagenet"])
def test_paper_presets_follow_the_recipe(tmp_path, preset):
    plan, _ = make_plan([preset, "--output_dir", str(tmp_path)])
    assert len(plan.specs) == len(COMPARED_UNCALIBRATED) * 4 * 3 and plan.threads is None
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
    adam, kwargs = paper_trainer_hooks(args)["optimizer_cls_and_kwargs"]
    assert adam is torch.optim.Adam and kwargs == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "sam,zsharpp"], "Unknown method.*zsharpp"),
        (["--models", "resnet57"], "Unknown model 'resnet57'"),
        (["--datasets", "./no/such/folder"], "Unknown dataset"),
        (["--num_train_epochs", "3"], "use --epochs"),
        (["--seed=4"], "use --seeds"),
        (["--sam_rho", "0.1"], "use --rho"),
        (["--zsharp_percentile", "0.9"], "use --percentile"),
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
    ("argv", "base"),
    [
        (["paper-cifar10", "--methods", "zsharp-random-loss-matched"], "zsharp-random"),
        (["digits", "--epochs", "2", "--methods", "zsharp-random-loss-matched"], "zsharp-random"),
        (["digits-long", "--methods", "zsharp-random-loss-matched"], "zsharp-random"),
        (["digits", "--methods", "none,sam-tuned"], "sam"),
        (["digits-long", "--models", "resnet56", "--methods", "zsharp-tuned"], "zsharp"),
        (["paper-cifar100", "--methods", "zsharp-random-loss-matched-long"], "zsharp-random"),
    ],
)
def test_a_radius_calibrated_or_tuned_in_another_setting_is_refused(tmp_path, argv, base):
    """A loss-matched or tuned radius holds for the data, models, epochs and flags it was found with; elsewhere the
    variant would run under a name that is not true, so the plan refuses it and says what to run instead."""
    with pytest.raises(
        ValueError, match=rf"was calibrated or tuned in the preset .*--methods {base} --rho R"
    ):
        make_plan([*argv, "--output_dir", str(tmp_path)])


def test_calibrated_and_tuned_radii_run_in_their_own_setting(tmp_path):
    for argv in (
        ["digits", "--methods", "zsharp-random-loss-matched", "--models", "resnet20"],
        ["digits-long", "--methods", "sam-tuned,zsharp-random-loss-matched-long"],
        ["digits", "--epochs", "20", "--methods", "zsharp-tuned"],  # the same setting under the other preset
    ):
        plan, _ = make_plan([*argv, "--output_dir", str(tmp_path)])
        assert plan.specs
    for name in PRESETS:  # every preset's own methods are allowed in it
        make_plan([name, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0"], ["--seeds", "1,1"], ["--seeds", "a"], ["--epochs", "0"], ["cifar"],
        ["--rho", "0"], ["--rho", "0.1,0.1"], ["--percentile", "1.0"], ["--threads", "0"],
    ],
)  # fmt: skip
def test_bad_options_exit_with_usage(tmp_path, argv):
    with pytest.raises(SystemExit):
        make_plan([*argv, "--output_dir", str(tmp_path)])


def test_paper_lr_factor():
    steps = 10  # per epoch
    assert paper_lr_factor(0, steps) == pytest.approx(1 / 50)
    assert paper_lr_factor(49, steps) == 1.0
    assert paper_lr_factor(50, steps) == 1.0  # warm-up done: StepLR counts from here
    assert paper_lr_factor(50 + 30 * steps - 1, steps) == 1.0
    assert paper_lr_factor(50 + 30 * steps, steps) == 0.75
    assert paper_lr_factor(50 + 60 * steps, steps) == pytest.approx(0.75**2)


def test_paper_lr_scheduler_follows_paper_lr_factor():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    steps_per_epoch = 4
    scheduler = paper_lr_scheduler(optimizer, steps_per_epoch)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(70 * steps_per_epoch):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    expected = [1e-3 * paper_lr_factor(step, steps_per_epoch) for step in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-12)  # LinearLR's recursive warm-up rounds at 1e-16


def test_paper_recipe_trainer_takes_the_steps_per_epoch_of_the_trainer(tmp_path):
    """7 batches with 2 accumulation steps: 4 optimizer steps per epoch, as Trainer counts them."""
    from tiny_training import TinyData, TinyNet, tiny_args

    args = tiny_args(
        str(tmp_path), max_steps=-1, num_train_epochs=6, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, lr_scheduler_type="linear", logging_steps=1,
    )  # fmt: skip
    trainer = PaperRecipeTrainer(model=TinyNet(), args=args, train_dataset=TinyData(56))
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert trainer.steps_per_epoch == 4 and len(logged) == 24
    assert logged == pytest.approx([1e-2 * paper_lr_factor(step, 4) for step in range(24)], rel=1e-12)


def test_the_options_are_a_dataclass_read_by_hf_argument_parser(tmp_path):
    plan, args = make_plan(["digits", "--seeds", "5,", "--rho", "0.01, 0.02", "--output_dir", str(tmp_path)])
    assert isinstance(args, ReproduceArguments)
    assert (args.seed_list, args.rho_values, args.percentile_values) == ((5,), (0.01, 0.02), None)
    assert ReproduceArguments(methods="sam,zsharp").method_names == ("sam", "zsharp")
    with pytest.raises(ValueError, match="--percentile: percentiles lie in"):
        ReproduceArguments(percentile="0.9,1.5")


def test_the_long_digits_preset_is_the_primary_setting(tmp_path):
    """Every method and control at 20 epochs on ten seeds, the worst case probed at three radii (issue 27)."""
    plan, _ = make_plan(["digits-long", "--output_dir", str(tmp_path)])
    assert plan.epochs == 20 and plan.preset.seeds == tuple(range(10)) and plan.threads == 1
    assert {s.method for s in plan.specs} == set(COMPARED_AT_20_EPOCHS)
    assert plan.preset.sharpness.rho == 0.05 and plan.preset.sharpness.extra_radii == (0.02, 0.2)
    assert plan.flags(plan.specs[0])[: len(PRESETS["digits"].train_args)] == list(
        PRESETS["digits"].train_args
    )
