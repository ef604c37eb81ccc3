"""Stopping and resuming `hf-zsharp-train`: Ctrl-C names the checkpoint to resume; a checkpoint that cannot be
resumed as it was saved is refused before training, naming the file (or, for `last`, passed over for the
previous one); a resumed run states the training loss of the whole run."""

import contextlib
import functools
import io
import json
import logging
import shutil

import pytest
from test_cli import FAST
from transformers import TrainerCallback

import hf_zsharp.run
from hf_zsharp.args import parse_train_args, resolve_run
from hf_zsharp.cards import render_model_card
from hf_zsharp.cli import train_main
from hf_zsharp.run import with_whole_run_loss

# Two steps per epoch of 16 examples; a checkpoint and a training log at every step.
STEPS = [
    *FAST,
    "--max_train_samples", "16",
    "--max_steps", "4",
    "--save_strategy", "steps",
    "--save_steps", "1",
    "--logging_strategy", "steps",
    "--logging_steps", "1",
]  # fmt: skip


class InterruptAfterSaving(TrainerCallback):
    """Ctrl-C once the checkpoint of `step` is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by Ctrl-C after its checkpoint at step 2 of 4: (output folder, exit, what it printed)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    training = functools.partial(hf_zsharp.run.run_training, callbacks=[InterruptAfterSaving(2)])
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(printed):
        patch.setattr(hf_zsharp.run, "run_training", training)
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--output_dir", str(out), *STEPS])
    return out, exit_info.value, printed.getvalue()


@pytest.fixture
def copy_of_run(interrupted, tmp_path):
    """A copy of the interrupted run's folder, to damage or resume."""
    return shutil.copytree(interrupted[0], tmp_path / "out")


def test_ctrl_c_prints_one_line_naming_the_last_checkpoint_and_exits_130(interrupted):
    out, exit, printed = interrupted
    assert exit.code == 130
    assert printed.splitlines()[-1] == (
        f"Interrupted: the last checkpoint is {out / 'checkpoint-2'}; resume it with --resume_from_checkpoint last."
    )
    assert "Traceback" not in printed


def test_a_resumed_run_states_the_training_loss_of_the_whole_run(copy_of_run):
    """Trainer's train_loss after a resume is the mean since the resume (steps 3-4); the card says "mean over
    the run", so the run weighs in the losses logged before it (steps 1-2)."""
    train_main(["--output_dir", str(copy_of_run), *STEPS, "--resume_from_checkpoint", "last"])
    history = json.loads((copy_of_run / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    whole_run = sum(losses) / 4
    assert json.loads((copy_of_run / "all_results.json").read_text())["train_loss"] == pytest.approx(
        whole_run
    )
    assert (
        f"| Training loss (mean over the run) | {whole_run:.4g} |" in (copy_of_run / "README.md").read_text()
    )


def test_a_loss_never_logged_before_the_resume_leaves_the_mean_since_the_resume_named_so():
    metrics = {"train_loss": 0.5, "eval_loss": 0.7}
    logged = [
        {"loss": 2.0, "step": 1},
        {"loss": 1.0, "step": 2},
        {"loss": 0.5, "step": 3},
        {"train_loss": 0.5},
    ]
    assert with_whole_run_loss(metrics, logged, 2, 4) == {
        "train_loss": (2.0 + 1.0 + 2 * 0.5) / 4,
        "eval_loss": 0.7,
    }
    # A checkpoint at step 3 with the last log at step 2: the loss of step 3 was never recorded.
    named = with_whole_run_loss(metrics, logged[:2], 3, 4)
    assert named == {"train_loss_since_resume": 0.5, "eval_loss": 0.7}
    card = render_model_card(model_name="m", settings={"sam": "zsharp"}, metrics=named, model_path="m")
    assert "| Training loss (mean since the run was resumed) | 0.5 |" in card.text


def damage(checkpoint, how):
    """Delete or spoil a file of `checkpoint` as a crash, a full disk or a cleanup would."""
    if how == "no optimizer.pt":
        (checkpoint / "optimizer.pt").unlink()
    elif how == "no scheduler.pt":
        (checkpoint / "scheduler.pt").unlink()
    elif how == "corrupt trainer_state.json":
        (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hist')
    elif how == "truncated model.safetensors":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no optimizer.pt", "has no optimizer.pt, so resuming it would restart the optimizer's state"),
        ("no scheduler.pt", "has no scheduler.pt, so resuming it would restart"),
        (
            "corrupt trainer_state.json",
            r"checkpoint-2/trainer_state.json' cannot be read \(Unterminated string",
        ),
        (
            "truncated model.safetensors",
            r"checkpoint-2/model.safetensors' cannot be read, it may be truncated",
        ),
    ],
)
def test_a_checkpoint_that_cannot_be_resumed_as_saved_is_refused_naming_the_file(copy_of_run, how, message):
    damage(copy_of_run / "checkpoint-2", how)
    state = (copy_of_run / "checkpoint-2" / "trainer_state.json").read_bytes()
    with pytest.raises(SystemExit, match=f"error: --resume_from_checkpoint: .*{message}") as exit_info:
        train_main(
            [
                "--output_dir",
                str(copy_of_run),
                *STEPS,
                "--resume_from_checkpoint",
                f"{copy_of_run}/checkpoint-2",
            ]
        )
    assert "\n" not in str(exit_info.value)
    assert not (copy_of_run / "checkpoint-3").exists()  # refused before training
    assert (copy_of_run / "checkpoint-2" / "trainer_state.json").read_bytes() == state


def test_resume_last_passes_over_an_incomplete_newest_checkpoint_and_says_so(copy_of_run, caplog):
    damage(copy_of_run / "checkpoint-2", "no optimizer.pt")
    argv = ["--output_dir", str(copy_of_run), *STEPS, "--resume_from_checkpoint", "last"]
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.args"):
        run = resolve_run(*parse_train_args(argv))
    assert run.resume_from == str(copy_of_run / "checkpoint-1")
    newest = copy_of_run / "checkpoint-2"
    assert (
        f"Resuming checkpoint-1, not a newer incomplete checkpoint: '{newest}' has no optimizer.pt"
        in caplog.text
    )
    # With no complete checkpoint left, the newest one and what it lacks are named.
    damage(copy_of_run / "checkpoint-1", "truncated model.safetensors")
    with pytest.raises(
        ValueError, match=r"no checkpoint of .* is complete; the newest: .*checkpoint-2' has no opt"
    ):
        resolve_run(*parse_train_args(argv))
