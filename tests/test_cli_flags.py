"""`hf-zsharp-train`'s flags before any work: unknown ones refused before transformers is imported (with the
parser's own words), the defaults `--help` shows, and a launcher that started fewer processes than asked."""

import logging
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from hf_zsharp import cli, flags
from hf_zsharp.args import TrainArgumentParser, parse_train_args

# The early check applies with the transformers release its option list was made for (else the parser checks).
early_check = pytest.mark.skipif(
    metadata.version("transformers") != flags.TRAIN_OPTIONS_TRANSFORMERS,
    reason="the early flag check stands aside with another transformers release",
)


def parser_options() -> set[str]:
    return {option for action in TrainArgumentParser()._actions for option in action.option_strings}


def test_the_option_names_checked_before_transformers_loads_are_the_parsers():
    """With the transformers release the list was made for, the list is the parser's; with another (the floors,
    a newer release) the early check stands aside and the parser alone checks."""
    options = parser_options()
    names = sorted({option[2:].replace("-", "_") for option in options if option.startswith("--")})
    if metadata.version("transformers") != flags.TRAIN_OPTIONS_TRANSFORMERS:
        assert flags.refuse_unknown_flags(["--not_an_option"]) is None
        return
    listed = [name for name in names if name not in flags.method_option_fields()]
    text = textwrap.fill(" ".join(listed), 104, initial_indent="    ", subsequent_indent="    ")
    update = f"set flags.TRAIN_OPTIONS_TRANSFORMERS to {metadata.version('transformers')!r} and the names to:\n{text}"
    assert set(listed) == flags.TRAIN_OPTION_NAMES, update
    # Each name is --name and, where it holds "_", --na-me: nothing more, nothing less.
    spelled = {"-h"} | {f"--{n}" for n in names} | {f"--{n.replace('_', '-')}" for n in names}
    assert spelled == options


def test_the_optimizers_options_are_read_from_their_declarations():
    """The method options' flags come from the `Option` declarations themselves (read without importing torch), so
    a new option is one declaration."""
    from hf_zsharp.optim import OPTIONS

    assert flags.method_option_fields() == {option.field for option in OPTIONS}


@early_check
@pytest.mark.parametrize(
    "argv",
    [
        ["--max_step", "2"],
        ["--learning-rat=0.1"],
        ["--sam", "sam", "--max_step", "2", "3", "--seed", "1", "--bogus"],
        ["--max_step", "-1", "--learning_rat", "0.1"],
        ["--no_dataloader_pin_memorie", "--seed", "1"],
    ],
)
def test_the_early_check_words_unknown_flags_as_the_parser_does(argv):
    with pytest.raises(ValueError) as early:
        flags.refuse_unknown_flags(argv)
    with pytest.raises(ValueError) as parser:
        parse_train_args(argv)
    assert str(early.value) == str(parser.value)


def test_known_flags_pass_the_early_check():
    flags.refuse_unknown_flags(
        [
            "run.yaml",
            "--max_steps",
            "-1",
            "--learning-rate=0.1",
            "--no_remove_unused_columns",
            "-h",
            "--",
            "--x",
        ]
    )


@early_check
def test_a_flag_typo_is_refused_before_torch_or_transformers_is_imported():
    """What made a typo take 10-22 s on a loaded 2-core machine: the imports, now after the check."""
    code = (
        "import sys\nfrom hf_zsharp.cli import train_main\ntry:\n    train_main(sys.argv[1:])\n"
        "except SystemExit as exit:\n    print(exit)\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    argv = ["--max_step", "2"]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    with pytest.raises(ValueError) as parser:
        parse_train_args(argv)
    assert result.stdout.splitlines() == [f"error: {parser.value}", "[]"], result.stderr


def test_help_shows_the_default_models_recipe_and_a_pretrained_run_keeps_its_own(capsys):
    """The option defaults of `--help` are the default run's (4 epochs at 3e-3, not TrainingArguments' 3 at
    5e-5); the from-scratch recipe they come from does not leak into a pretrained model's run."""
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())

    def default_of(option: str) -> str:
        start = text.index(f"--{option} {option.upper()}")
        return text[text.index("(default: ", start) :].split(")", 1)[0].removeprefix("(default: ")

    assert [default_of(o) for o in ("num_train_epochs", "learning_rate", "weight_decay", "warmup_steps")] == [
        "4",
        "0.003",
        "5e-05",
        "10",
    ]
    assert "The option defaults shown below are the default model's (resnet20, from scratch)" in text
    _, _, tuned = parse_train_args(["--model_name_or_path", "some/vit"])
    assert (tuned.num_train_epochs, tuned.learning_rate, tuned.weight_decay) == (3, 5e-5, 0.0)


class Stop(ValueError):
    """Raised where a test has seen what it needs, before any training."""


def stop(*args, **kwargs):
    raise Stop("stopped before loading the data")


def test_a_launcher_that_started_one_of_several_processes_is_named_before_training(
    tmp_path, monkeypatch, caplog
):
    """`accelerate launch --num_processes 2` without GPUs runs its single-process launcher, which sets these
    variables (and no WORLD_SIZE): the run says so, and how to get the processes, before the data loads."""
    for name, value in {
        "ACCELERATE_USE_CPU": "False",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("hf_zsharp.run.load_image_dataset", stop)
    argv = ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--report_to", "none", "--use_cpu"]
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.cli"), pytest.raises(SystemExit, match="stopped"):
        cli.train_main(argv)
    assert "accelerate launch was asked for more than one process but started this one alone" in caplog.text
    assert "torchrun --nproc_per_node N" in caplog.text and "accelerate launch --multi_gpu" in caplog.text


def test_no_launcher_warning_for_one_process_or_a_real_group(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.cli"):
        cli.warn_single_process_launch({"ACCELERATE_USE_CPU": "False"})  # accelerate launch, one process
        cli.warn_single_process_launch({"MASTER_PORT": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True"})
        cli.warn_single_process_launch({"MASTER_PORT": "1", "WORLD_SIZE": "2"})  # torchrun
    assert caplog.text == ""
