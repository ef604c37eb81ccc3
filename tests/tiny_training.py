"""Tiny models, data and reference loops for the trainer tests; run under torchrun it is the DDP worker.

    torchrun --nproc_per_node 2 tests/tiny_training.py OUT_DIR

runs the DDP scenarios of tests/test_ddp.py on the CPU (gloo) and writes one JSON file per rank to OUT_DIR.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.trainer import ZSharpTrainer

IN_FEATURES, CLASSES = 8, 3


class TinyNet(nn.Module):
    """A 2-layer MLP returning `{"loss", "logits"}`; counts its forward calls and can poison chosen ones.

    Forward call numbers in `poison` (1-based) return an infinite loss, so that backward gives non-finite
    gradients.
    """

    def __init__(
        self, seed: int = 0, dropout: float = 0.0, batchnorm: bool = False, hidden: int = 16
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        # No bias before BatchNorm: BatchNorm cancels it, so its gradient would be pure rounding noise, which
        # Adam (dividing a gradient by its own size) turns into lr-sized, CPU-dependent updates.
        layers: list[nn.Module] = [nn.Linear(IN_FEATURES, hidden, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        if dropout:  # before the ReLU (equivalent), so that the zeros it leaves are exactly its mask
            layers.append(nn.Dropout(dropout))
        layers.append(nn.ReLU())
        layers.append(nn.Linear(hidden, CLASSES))
        self.net = nn.Sequential(*layers)
        self.calls = 0
        self.poison: set[int] = set()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        logits = self.net(x)
        loss = F.cross_entropy(logits.float(), labels)
        if self.calls in self.poison:
            loss = loss * math.inf
        return {"loss": loss, "logits": logits}


class TinyData(torch.utils.data.Dataset):
    """Random inputs with labels a linear function of them (so the loss can fall)."""

    def __init__(self, n: int = 64, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_FEATURES, generator=g)
        self.labels = (self.x @ torch.randn(IN_FEATURES, CLASSES, generator=g)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive batches, the order of `train_sampling_strategy="sequential"`."""
        return [
            {"x": self.x[i : i + batch_size], "labels": self.labels[i : i + batch_size]}
            for i in range(0, len(self), batch_size)
        ]


def tiny_args(output_dir: str, **overrides) -> ZSharpTrainingArguments:
    """Quiet CPU arguments with sequential data order; `overrides` go to `ZSharpTrainingArguments`."""
    defaults = {
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "optim": "adamw_torch_fused",  # the Trainer's CPU default, pinned: reference loops build the same base
        "max_grad_norm": 0.0,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    }
    return ZSharpTrainingArguments(output_dir=output_dir, **{**defaults, **overrides})


def flat(model: nn.Module) -> torch.Tensor:
    """All parameters of `model`, concatenated (a detached copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainer's weight-decay grouping for TinyNet: biases get none."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if "bias" not in n], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if "bias" in n], "weight_decay": 0.0},
    ]


def _sync_flags(trainer: ZSharpTrainer) -> tuple[dict[str, list[bool]], dict]:
    """Record DDP's `require_backward_grad_sync` at every forward and every backward of the model.

    The returned state dict must be given the DDP wrapper (`"ddp"`) once training has prepared it.
    """
    flags: dict[str, list[bool]] = {"forward": [], "backward": []}
    state: dict[str, object] = {}

    def on_forward(module, args):
        ddp = state.get("ddp")
        if ddp is not None:
            flags["forward"].append(bool(ddp.require_backward_grad_sync))

    def on_backward(grad):
        ddp = state.get("ddp")
        if ddp is not None:
            flags["backward"].append(bool(ddp.require_backward_grad_sync))
        return grad

    trainer.model.register_forward_pre_hook(on_forward)
    trainer.model.net[-1].bias.register_hook(on_backward)
    return flags, state


def leave_process_group() -> None:
    """End a worker whose results are written: leave together, close the process group, then exit at once.

    Gloo's worker threads can still abort the interpreter's finalization after that ("terminate called without
    an active exception", SIGABRT on one rank, seen with 2 and 3 ranks), so the worker skips finalization.
    """
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ddp_case(out: Path, name: str, model: TinyNet, **overrides) -> dict:
    """Train under DDP, recording sync flags, forward calls and parameter checksums per step."""
    from transformers import TrainerCallback

    rank = int(os.environ["RANK"])
    trainer = ZSharpTrainer(
        model=model, args=tiny_args(str(out / name), **overrides), train_dataset=TinyData()
    )
    flags, state = _sync_flags(trainer)
    record: dict[str, list] = {"checksums": [], "calls_per_step": []}

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            state["ddp"] = trainer.model_wrapped
            state["calls"] = model.calls

        def on_step_end(self, args, st, control, **kw):
            checksum = torch.tensor(
                [float(flat(model).double().sum()), float(flat(model).abs().double().sum())]
            )
            record["checksums"].append(checksum.tolist())
            record["calls_per_step"].append(model.calls - state["calls"])

    trainer.add_callback(Recorder())
    trainer.train()
    record["flags"] = flags
    record["params"] = flat(model).tolist()
    record["rank"] = rank
    record["skipped_steps"] = sum(log.get("sam_skipped_steps", 0) for log in trainer.state.log_history)
    return record


def main(out_dir: str) -> None:
    """The DDP scenarios of tests/test_ddp.py; each rank writes `rank{r}.json` to `out_dir`."""
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    results = {
        # 2 ranks x batch 2 x accumulation 2 with the ascent all-reduced: compared with 1 process x batch 8.
        "sync": _run_ddp_case(
            out,
            "sync",
            TinyNet(),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            sam_sync_ascent=True,
        ),
        # Each replica's own ascent: first passes under no_sync.
        "local": _run_ddp_case(
            out, "local", TinyNet(), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3
        ),
    }
    # Rank 1 alone gets non-finite gradients in the first pass of step 1 (its forward call 3), then in the
    # second pass of step 1 (call 4), which DDP all-reduces into both ranks' gradients.
    for name, call in (("skip", 3), ("skip_second_pass", 4)):
        poisoned = TinyNet()
        if rank == 1:
            poisoned.poison = {call}
        results[name] = _run_ddp_case(
            out, name, poisoned, per_device_train_batch_size=4, max_steps=3, logging_steps=3
        )
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
