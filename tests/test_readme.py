"""The README's Python blocks, run as written, in the set-ups they describe (Lightning's, timm's and TRL's blocks
run in test_lightning.py, test_timm_integration.py and test_trl.py), and its reproduction commands, planned."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from readme_blocks import code_blocks
from reference import cnn
from tiny_training import TinyData, TinyNet, tiny_args
from torch import nn

from hf_zsharp import ZSharp
from hf_zsharp.reproduce.cli import make_plan


def batchnorm_counts(model: nn.Module) -> list[int]:
    return [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_the_optimizer_and_closure_blocks_take_two_passes_per_step():
    (by_hand,) = code_blocks("## The optimizer")
    (closure_forms,) = code_blocks("### A plain loop with a closure (davda54/sam's forms)")
    torch.manual_seed(0)
    model = cnn()
    start = copy.deepcopy(model.state_dict())
    passes = []
    model.register_forward_pre_hook(lambda module, args: passes.append(1))
    namespace = {
        "model": model,
        "x": torch.randn(8, 3, 8, 8),
        "y": torch.randint(10, (8,)),
        "loss_fn": nn.functional.cross_entropy,
    }
    exec(by_hand, namespace)
    assert (
        isinstance(namespace["optimizer"], ZSharp) and len(passes) == 2 and batchnorm_counts(model) == [1, 1]
    )
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items() if "weight" in k)
    exec(closure_forms, namespace)
    assert len(passes) == 2 + 2 + 2  # each step two passes; each advances BatchNorm's statistics once
    assert batchnorm_counts(model) == [3, 3]


def test_the_trainer_block_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = code_blocks("## With `transformers.Trainer`")
    # The block's own arguments, made quick and quiet (its output_dir "out" lands in tmp_path).
    fast = tiny_args("out", bf16=True).to_dict()
    args_class = __import__("hf_zsharp").ZSharpTrainingArguments

    def quick_arguments(**kwargs):
        overrides = {
            k: fast[k] for k in ("max_steps", "use_cpu", "report_to", "save_strategy", "disable_tqdm")
        }
        return args_class(**{**kwargs, **overrides})

    monkeypatch.setattr("hf_zsharp.ZSharpTrainingArguments", quick_arguments)
    namespace = {"model": TinyNet(), "train": TinyData(), "test": TinyData(16, 2), "collate": None}
    exec(block, namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == fast["max_steps"] and trainer.args.bf16
    assert trainer.optimizer.optimizer.method_settings()["percentile"] == 0.95


class Recorder(GeneralTracker):
    """An Accelerate tracker that keeps what `accelerator.log` sends it."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict] = []

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append(dict(values))


class WhichBatch(TinyNet):
    """TinyNet that records which micro-batch each pass ran on (the batches carry their index in x[:, 0])."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x, labels):
        self.seen.append(int(x[0, 0]))
        return super().forward(x, labels)


def test_the_accelerate_block_pairs_each_second_pass_with_its_micro_batch_and_logs_the_statistics():
    (block,) = code_blocks("## With your own Accelerate loop")
    recorder = Recorder()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, log_with=[recorder])
    accelerator.init_trackers("readme")
    model = WhichBatch()
    optimizer = ZSharp(model.parameters(), torch.optim.AdamW, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [
        {"x": torch.randn(4, 8).index_fill(1, torch.tensor([0]), i), "labels": torch.arange(4) % 3}
        for i in range(4)
    ]
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    exec(block, {"accelerator": accelerator, "model": model, "optimizer": optimizer, "scheduler": scheduler,
                 "loader": batches})  # fmt: skip
    # Per optimizer step: the first passes of micro-batches 0 and 1, then their second passes, in order.
    assert model.seen == [0, 1, 0, 1, 2, 3, 2, 3]
    assert len(recorder.logged) == 2
    assert {"loss", "sam_perturbation_norm", "sam_kept_fraction", "sam_loss_increase"} <= set(
        recorder.logged[0]
    )


def test_the_reproduction_commands_plan_the_grids_their_comments_state(tmp_path, monkeypatch):
    """Each `hf-zsharp-reproduce` line of the README's reproduction block is planned as the command would plan it
    (every flag parsed, no training), and a comment's "N methods x M seeds" is the plan's size."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (block,) = code_blocks("## Reproducing the paper's comparison", language="bash")
    lines = [line for line in block.splitlines() if line.startswith("hf-zsharp-reproduce ")]
    assert len(lines) >= 3
    stated = 0
    for line in lines:
        command, _, comment = line.partition("#")
        plan, _ = make_plan([*shlex.split(command)[1:], "--output_dir", str(tmp_path / "out")])
        counts = re.search(r"(\d+) methods x (\d+) seeds", comment)
        if counts:
            stated += 1
            methods, seeds = map(int, counts.groups())
            assert (len(plan.preset.methods), len(plan.preset.seeds)) == (methods, seeds), line
            assert len(plan.specs) == methods * seeds, line
    assert stated >= 2
    with pytest.raises(ValueError, match="Unknown method"):  # the planning is the real one: it refuses typos
        make_plan(["digits", "--methods", "zsharpp", "--output_dir", str(tmp_path / "out")])
