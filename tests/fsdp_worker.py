"""FSDP2 scenarios for tests/test_fsdp.py, run on the CPU under torchrun (gloo); each rank writes rank{r}.json.

    torchrun --nproc_per_node N tests/fsdp_worker.py OUT_DIR [optimizer|trainer|cli]

"optimizer" (the default): every scenario compares the sharded run with one process computing the same thing on
the whole tensors or the global batch (each rank computes that reference itself, without collectives) and records
the differences. "trainer": `ZSharpTrainer` and `accelerate_step` under Accelerate's FSDP2, forced on the CPU
(`force_fsdp_on_cpu`); each rank records its parameters, logs and checks, compared by the tests with one process.
"cli": `hf-zsharp-train` (the paper's ResNet-20 on digits, FSDP2 from the launcher's environment) into OUT_DIR/run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_training import leave_process_group
from torch import nn
from torch.distributed.fsdp import fully_shard

from hf_zsharp.optim import create_sam_optimizer, sharded
from hf_zsharp.optim.sharded import Slice, exact_top_share

GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks
STEPS = 3


class Awkward(nn.Module):
    """Tensors FSDP2 splits awkwardly: uneven rows, fewer rows than ranks, a block of tied (zero) gradient rows,
    a gradient constant over the tensor; some above `sharded.SMALL` entries (sampled), some below (gathered)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 40)  # 12000 entries; tokens < 16 only: 95 % zero gradient rows
        self.hidden = nn.Linear(40, 250)  # 10000: 125 / 125 rows on 2 ranks, 84 / 84 / 82 on 3
        self.wide = nn.Linear(250, 203)  # 50750
        self.out = nn.Linear(203, 1)  # one row: every rank but the first holds an empty shard
        self.pair = nn.Parameter(torch.randn(2, 5) * 0.3)  # two rows: the third rank holds none
        self.scale = nn.Parameter(torch.ones(8, 8))  # its gradient is the same number everywhere

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(tokens).mean(1)))
        h = torch.tanh(self.wide(h))
        return self.out(h).squeeze(1) + (x @ self.pair.T).sum(1) + self.scale.mean() * h.mean(1)


def batch(step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(16, (GLOBAL_BATCH, 6), generator=g)
    return tokens, torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, generator=g)


def loss_of(model: nn.Module, step: int, rank: int | None = None, world: int = 1) -> torch.Tensor:
    """Mean squared error on the global batch (rank None) or on rank's equal share of it."""
    tokens, x, target = batch(step)
    if rank is not None:
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        tokens, x, target = tokens[share], x[share], target[share]
    dtype = next(model.parameters()).dtype
    return (model(tokens, x.to(dtype)) - target.to(dtype)).square().mean()


def shard(model: nn.Module, ignored: set[nn.Parameter] | None = None) -> nn.Module:
    for child in (model.hidden, model.wide):
        fully_shard(child)
    fully_shard(model, ignored_params=ignored)
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, sharded.DTensor) else p.detach()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [full(p).clone() for p in model.parameters()]


@contextmanager
def counting_collectives():
    """Record the collectives called through torch.distributed while inside, with the bytes each rank receives."""
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single")}

    def counted(name):
        def call(tensor, *args, **kwargs):
            calls.append((name, tensor.numel() * tensor.element_size()))
            return originals[name](tensor, *args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def run_training(method: str, options: dict, rank: int, world: int, mixed: bool = False, poison=None) -> dict:
    """STEPS two-pass steps sharded (float64) and on one process on the global batch; the differences.

    `poison` = (step, pass, rank): that rank's shard of `wide.weight`'s gradient gets a NaN in that pass.
    `mixed`: `pair` stays out of FSDP (replicated); its gradient is averaged by hand, as DDP would.
    """
    reference = Awkward().double()
    model = copy.deepcopy(reference)
    shard(model, ignored={model.pair} if mixed else None)
    kwargs = {"lr": 0.05, "momentum": 0.9, **options}
    ours = create_sam_optimizer(method, model.named_parameters(), torch.optim.SGD, **kwargs)
    theirs = create_sam_optimizer(method, reference.named_parameters(), torch.optim.SGD, **kwargs)
    record = {"masks_equal": [], "perturbed": [], "stats": [], "collectives": []}

    def poisoned(m, step, which, here):
        if poison is not None and poison[:2] == (step, which) and (here is None or here == poison[2]):
            sharded.local(m.wide.weight.grad).view(-1)[:1] = math.nan

    for step in range(STEPS):
        ours.zero_grad()
        theirs.zero_grad()
        loss_of(model, step, rank, world).backward()
        loss_of(reference, step).backward()
        if mixed:
            dist.all_reduce(model.pair.grad, op=dist.ReduceOp.AVG)
        poisoned(model, step, 1, rank)
        poisoned(reference, step, 1, None)
        before = snapshot(model)
        with counting_collectives() as calls:
            perturbed = ours.first_step(zero_grad=True)
        record["collectives"].append(calls)
        ref_before = snapshot(reference)
        ref_perturbed = theirs.first_step(zero_grad=True)
        moved = [(a != b) for a, b in zip(snapshot(model), before)]
        ref_moved = [(a != b) for a, b in zip(snapshot(reference), ref_before)]
        record["masks_equal"].append(all(torch.equal(a, b) for a, b in zip(moved, ref_moved)))
        record["perturbed"].append([perturbed, ref_perturbed])
        record["stats"].append([dict(ours.ascent_stats), dict(theirs.ascent_stats)] if perturbed else None)
        loss_of(model, step, rank, world).backward()
        loss_of(reference, step).backward()
        if mixed:
            dist.all_reduce(model.pair.grad, op=dist.ReduceOp.AVG)
        poisoned(model, step, 2, rank)
        poisoned(reference, step, 2, None)
        with counting_collectives() as calls:
            ours.second_step(zero_grad=True)
        record["collectives"][-1] += calls
        theirs.second_step(zero_grad=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(snapshot(model), snapshot(reference))]
    record["max_param_diff"] = max(diffs)
    record["changed"] = float(
        max((a - b).abs().max() for a, b in zip(snapshot(reference), snapshot(Awkward())))
    )
    record["finite"] = all(math.isfinite(d) for d in diffs)
    return record


def two_pass(model: nn.Module, optimizer, step: int, rank: int, world: int) -> None:
    optimizer.zero_grad()
    loss_of(model, step, rank, world).backward()
    optimizer.first_step(zero_grad=True)
    loss_of(model, step, rank, world).backward()
    optimizer.second_step(zero_grad=True)


def run_checkpoint(method: str, options: dict, rank: int, world: int, directory: Path) -> dict:
    """Two steps, a sharded checkpoint (torch.distributed.checkpoint, as Accelerate's FSDP2 saves), two more; a
    fresh sharded model and optimizer loaded from the checkpoint take the same two steps: bit-identical?"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build():
        model = shard(Awkward())
        return model, create_sam_optimizer(
            method, model.named_parameters(), torch.optim.AdamW, lr=1e-2, **options
        )

    model, optimizer = build()
    for step in range(2):
        two_pass(model, optimizer, step, rank, world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    for step in (2, 3):
        two_pass(model, optimizer, step, rank, world)
    resumed, resumed_optimizer = build()
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for step in (2, 3):
        two_pass(resumed, resumed_optimizer, step, rank, world)
    keys = sorted({key for entry in optimizer_state["state"].values() for key in entry})
    return {
        "identical": all(torch.equal(a, b) for a, b in zip(snapshot(model), snapshot(resumed))),
        "state_keys": keys,
    }


STATISTICS_CASES = {
    "random": lambda g: torch.randn(300, 70, generator=g),
    "row_scales": lambda g: torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g).pow(4) * 10,
    "zero_rows": lambda g: torch.randn(400, 40, generator=g) * (torch.arange(400) < 12)[:, None],
    "quantised": lambda g: (torch.randn(200, 60, generator=g) * 4).round() / 4,
    "constant": lambda g: torch.full((128, 100), 0.3),
    "large_on_first_rows": lambda g: (
        torch.randn(300, 50, generator=g) * (1 + 99 * (torch.arange(300) < 100))[:, None]
    ),
    "small": lambda g: torch.randn(7, 13, generator=g),
    "one_row": lambda g: torch.randn(1, 7, generator=g),
    "two_rows": lambda g: torch.randn(2, 5, generator=g),
}


def slice_rows(full_grad: torch.Tensor, rank: int, world: int) -> Slice:
    rows = full_grad.shape[0]
    size, row_numel = -(-rows // world), full_grad[0].numel()
    ranges = [(min(r * size, rows) * row_numel, min((r + 1) * size, rows) * row_numel) for r in range(world)]
    start, end = ranges[rank]
    return Slice(full_grad.reshape(-1)[start:end].clone(), full_grad.numel(), ranges, rank)


def run_statistics(rank: int, world: int, centred: bool, missed: bool = False) -> dict:
    """`exact_top_share` on each case's float32 gradient against torch.quantile on the whole tensor."""
    g = torch.Generator().manual_seed(7)
    fulls = {name: make(g).float() for name, make in STATISTICS_CASES.items()}
    group = dist.group.WORLD
    slices = [slice_rows(t, rank, world) for t in fulls.values()]
    qs = [0.95, 0.9, 0.95, 0.95, 0.95, 0.95, 0.8, 0.95, 0.5]
    original = sharded.sample_bounds
    if missed:  # bounds that miss the quantile: every sampled tensor must be gathered whole, still exact
        sharded.sample_bounds = lambda scores, numel, q: (float(scores.max()) + 1, float(scores.max()) + 2)
    try:
        with counting_collectives() as calls:
            _, kept = exact_top_share(group, slices, qs, centred, torch.zeros(1, dtype=torch.float64))
    finally:
        sharded.sample_bounds = original
    out = {"collectives": calls, "cases": {}}
    for (name, t), q, k in zip(fulls.items(), qs, kept):
        flat = t.reshape(-1)
        mean = (
            float(torch.tensor(flat.double().sum().item() / flat.numel(), dtype=torch.float32))
            if centred
            else 0.0
        )
        s = (flat - mean).abs()
        threshold = torch.quantile(s, q)
        keep = s > threshold
        start, end = slice_rows(t, rank, world).ranges[rank]
        out["cases"][name] = {
            "mine_kept": torch.equal(
                k.index.sort().values + start, keep[start:end].nonzero().squeeze(1) + start
            ),
            "threshold": [float(k.threshold), float(threshold)],
            "count": [int(k.count), int(keep.sum())],
            "sumsq": [float(k.sumsq), float(flat[keep].double().square().sum())],
        }
    return out


def force_fsdp_on_cpu() -> None:
    """Test-only: let Accelerate honour an FSDP plugin on the CPU. It does so only on GPU-like devices: with
    several CPU processes it silently sets up DDP instead."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)

    AcceleratorState.__init__ = init


def run_trainer(
    out: Path,
    name: str,
    model: nn.Module,
    resume: str | None = None,
    state_dict_type: str = "SHARDED",
    **overrides,
) -> dict:
    """Train TinyNet with `ZSharpTrainer` under FSDP2: whole parameters, training logs, what the optimizer saw."""
    from tiny_training import TinyData, tiny_args
    from transformers import TrainerCallback

    from hf_zsharp.trainer import ZSharpTrainer

    seen = {}

    class Peek(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            seen["param_types"] = sorted(
                {type(p).__name__ for g in optimizer.param_groups for p in g["params"]}
            )
            seen["param_dtypes"] = sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"]})

    fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": f"{state_dict_type}_STATE_DICT"}}
    args = tiny_args(str(out / name), **{**fsdp, "logging_steps": 1, **overrides})
    trainer = ZSharpTrainer(model=model, args=args, train_dataset=TinyData(), callbacks=[Peek()])
    trainer.train(resume_from_checkpoint=resume)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {
        "params": torch.cat([full(p).reshape(-1) for p in trainer.model.parameters()]).tolist(),
        "logs": logs,
        "sync_ascent": trainer._two_pass.sync_ascent,
        **seen,
    }


def run_accelerate_step(rank: int, world: int) -> list[float]:
    """`accelerate_step` in a plain Accelerate loop under FSDP2: 2 ranks x batch 4 against one process x batch 8."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from tiny_training import TinyData, TinyNet

    from hf_zsharp import ZSharp
    from hf_zsharp.two_pass import accelerate_step

    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    model = TinyNet()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in TinyData().batches(8)[:3]:
        share = {k: v[rank * 8 // world : (rank + 1) * 8 // world] for k, v in batch.items()}
        accelerate_step(accelerator, model, optimizer, share)
        optimizer.step()
        optimizer.zero_grad()
    return torch.cat([full(p).reshape(-1) for p in model.parameters()]).tolist()


def trainer_main(out: Path, rank: int, world: int) -> dict:
    """The Trainer scenarios (2 ranks x batch 2 x accumulation 2 = one process x batch 8)."""
    from tiny_training import TinyNet

    force_fsdp_on_cpu()
    batches = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    results = {  # accelerate_step first: Accelerate's state (e.g. bf16) outlives a Trainer in the process
        "accelerate_step": run_accelerate_step(rank, world),
        "sync": run_trainer(out, "sync", TinyNet(), **batches),
        "clip_interval": run_trainer(out, "clip", TinyNet(), max_grad_norm=0.5, sam_interval=2, **batches),
        "fsam": run_trainer(out, "fsam", TinyNet(), sam="fsam", **batches),
        "bf16": run_trainer(out, "bf16", TinyNet(), bf16=True, **batches),
    }
    poisoned = TinyNet()
    if rank == world - 1:  # its first pass of step 1 (forward call 3): every rank must skip that step
        poisoned.poison = {3}
    results["skip"] = run_trainer(
        out, "skip", poisoned, per_device_train_batch_size=4, max_steps=3, logging_steps=3
    )
    save = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, **batches}
    results["straight"] = run_trainer(out, "ckpt", TinyNet(dropout=0.2), **save)
    checkpoint = str(out / "ckpt" / "checkpoint-2")
    results["resumed"] = run_trainer(out, "resumed", TinyNet(dropout=0.2), resume=checkpoint, **save)
    results["checkpoint_files"] = sorted(path.name for path in Path(checkpoint).iterdir())
    save["state_dict_type"] = "FULL"  # whole model and optimizer state, written by rank 0
    results["full_straight"] = run_trainer(out, "full", TinyNet(dropout=0.2), sam="fsam", **save)
    checkpoint = str(out / "full" / "checkpoint-2")
    results["full_resumed"] = run_trainer(
        out, "full_resumed", TinyNet(dropout=0.2), checkpoint, sam="fsam", **save
    )
    results["full_checkpoint_files"] = sorted(path.name for path in Path(checkpoint).iterdir())
    return results


def main(out_dir: str, mode: str = "optimizer") -> None:
    if mode == "cli":
        from hf_zsharp.cli import train_main

        force_fsdp_on_cpu()
        fast = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--save_strategy", "no"]
        small = ["--max_train_samples", "64", "--max_eval_samples", "32", "--report_to", "none"]
        train_main(["--output_dir", str(Path(out_dir, "run")), *fast, *small])
        return
    if mode == "trainer":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        results = trainer_main(Path(out_dir), rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        leave_process_group()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {
        "statistics": run_statistics(rank, world, centred=True),
        "statistics_magnitude": run_statistics(rank, world, centred=False),
        "statistics_missed": run_statistics(rank, world, centred=True, missed=True),
    }
    methods = {
        "zsharp": ("zsharp", {}),
        "zsharp_magnitude": ("zsharp", {"mask": "magnitude"}),
        "zsharp_random": ("zsharp", {"mask": "random", "seed": 5}),
        "zsharp_global": ("zsharp", {"radius": "global"}),
        "zsharp_none": ("zsharp", {"mask": "none"}),
        "sam": ("sam", {}),
        "asam": ("asam", {}),
        "fsam": ("fsam", {}),
    }
    for name, (method, options) in methods.items():
        results[name] = run_training(method, options, rank, world)
    results["zsharp_mixed"] = run_training("zsharp", {}, rank, world, mixed=True)
    results["zsharp_random_mixed"] = run_training("zsharp", {"mask": "random"}, rank, world, mixed=True)
    results["zsharp_nan_first"] = run_training("zsharp", {}, rank, world, poison=(1, 1, world - 1))
    results["zsharp_nan_second"] = run_training("zsharp", {}, rank, world, poison=(1, 2, world - 1))
    for name, (method, options) in {
        "checkpoint_zsharp": ("zsharp", {}),
        "checkpoint_fsam": ("fsam", {}),
    }.items():
        results[name] = run_checkpoint(method, options, rank, world, Path(out_dir, name))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
