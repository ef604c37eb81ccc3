"""FSDP2: the SAM family on sharded parameters equals one process on the whole tensors and the global batch.

The scenarios run in tests/fsdp_worker.py under torchrun (2 and 3 CPU processes over gloo: 3 gives uneven and
empty shards); each rank records its differences from one process, which every rank computes itself.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ddp import failure_report
from tiny_training import TinyData, TinyNet, flat, tiny_args

from hf_zsharp.optim import FriendlySAM, ZSharp
from hf_zsharp.optim.selection import quantile_rank
from hf_zsharp.optim.sharded import locate, sample_bounds
from hf_zsharp.trainer import ZSharpTrainer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fsdp_worker.py")
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp2.yaml"
WORLDS = (2, 3)
TRAINING = [
    "zsharp",
    "zsharp_magnitude",
    "zsharp_random",
    "zsharp_global",
    "zsharp_none",
    "sam",
    "asam",
    "fsam",
]
THREE_ROUNDS = {
    "zsharp",
    "zsharp_magnitude",
    "zsharp_global",
    "zsharp_mixed",
    "zsharp_nan_first",
    "zsharp_nan_second",
}


def run_worker(
    worker: Path, world: int, out: Path, mode: str = "optimizer", launcher: list[str] | None = None
) -> list[dict] | None:
    """Run `worker` in `mode` on `world` CPU processes under torchrun (or `launcher`); each rank's JSON results."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    env.pop("ACCELERATE_USE_CPU", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = torchrun if launcher is None else launcher
    proc = subprocess.run(
        [*cmd, str(worker), str(out), mode], env=env, capture_output=True, text=True, timeout=300, cwd=out
    )
    assert proc.returncode == 0, failure_report(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)] if mode != "cli" else None


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    return run_worker(WORKER, request.param, tmp_path_factory.mktemp(f"fsdp{request.param}"))


# --- the statistics: exact_top_share against torch.quantile on the whole tensor ---------------------------------


@pytest.mark.parametrize("kind", ["statistics", "statistics_magnitude", "statistics_missed"])
def test_threshold_count_and_norm_equal_torch_quantile_on_the_whole_tensor(ranks, kind):
    """Float32 gradients (random, scaled rows, 97 % zero rows, quantised, constant, large values on the first
    rank, tensors below the sampling size and with fewer rows than ranks): the same threshold bit for bit, the
    same kept count; the kept sum of squares is a float64 sum of <= 21000 float32 squares in another order
    (relative error <= 21000 * 2^-53 ~ 2e-12). "missed": bounds that miss the quantile fall back to exact."""
    for rank in ranks:
        for name, case in rank[kind]["cases"].items():
            ours, torchs = case["threshold"]
            assert ours == torchs, name
            assert case["count"][0] == case["count"][1], name
            assert case["mine_kept"], name  # this rank's kept positions: the reference mask's in its rows
            assert case["sumsq"][0] == pytest.approx(case["sumsq"][1], rel=1e-11), name


def test_three_collectives_and_small_windows(ranks):
    """One all_reduce (sums, samples), one all_gather (7 counts per tensor), one all_gather (the windows). What
    each rank receives in the last stays a small share of the entries: the windows about 2 (4 sigma + 1 / m) of
    a sampled tensor's (sigma = sqrt(0.05 * 0.95 / m), m = (0.44 n)^(2/3): ~10 % at these 12k-21k entries,
    shrinking as n^(-1/3), ~1 % at 10M), the small tensors (108 entries) whole, plus padding to the largest rank.
    Missed bounds gather everything."""
    entries = 300 * 70 + 256 * 64 + 400 * 40 + 200 * 60 + 128 * 100 + 300 * 50 + 7 * 13 + 7 + 10
    for rank in ranks:
        for kind in ("statistics", "statistics_magnitude"):
            calls = rank[kind]["collectives"]
            assert [name for name, _ in calls] == ["all_reduce", "all_gather_single", "all_gather_single"]
            assert calls[2][1] < 0.2 * 4 * entries
        assert rank["statistics_missed"]["collectives"][2][1] >= 4 * entries


def test_sample_bounds_hold_the_quantile_of_a_plain_sort():
    """`sample_bounds` against the definition: b <= the two order statistics torch.quantile uses <= u."""
    gen = np.random.default_rng(0)
    for numel, q in [(20_000, 0.95), (50_000, 0.9), (9_000, 0.5), (100_000, 0.99)]:
        scores = np.abs(gen.standard_normal(numel))
        low, weight = quantile_rank(numel, q)
        ordered = np.sort(scores)
        sample = scores[gen.integers(numel, size=int((0.44 * numel) ** (2 / 3)))]
        b, u = sample_bounds(sample.astype(np.float32), numel, q)
        assert b <= ordered[low] and ordered[low + (weight > 0)] <= u


def test_locate_reads_order_statistics_off_the_counts():
    """Counts (< b, <= b, < u, <= u) of the scores [1, 2, 2, 3, 4, 5, 5, 6] with b = 2, u = 5, against the sort."""
    scores = np.array([1, 2, 2, 3, 4, 5, 5, 6])
    b, u = 2, 5
    counts = np.array([(scores < b).sum(), (scores <= b).sum(), (scores < u).sum(), (scores <= u).sum()])
    places = {1: "missed", 2: "b", 3: "window", 4: "window", 5: "u", 6: "missed"}
    for rank, value in enumerate(np.sort(scores)):
        assert locate(rank, counts) == places[value]


# --- whole training steps against one process on the global batch -------------------------------------------------


@pytest.mark.parametrize("name", [*TRAINING, "zsharp_mixed", "zsharp_random_mixed"])
def test_steps_match_one_process_on_the_global_batch(ranks, name):
    """Three full steps (float64 model, SGD with momentum): parameters within 1e-6 of one process on the global
    batch (measured ~3e-10: one process takes the kept norm in float32, relative error ~1e-7, times rho and the
    learning rate), the same entries moved at every ascent, the same logged statistics. "mixed": one parameter
    left out of FSDP (replicated, its gradient averaged by hand)."""
    for rank in ranks:
        run = rank[name]
        assert run["finite"] and run["changed"] > 0.1
        assert run["max_param_diff"] <= 1e-6
        assert all(run["masks_equal"])
        assert all(ours and theirs for ours, theirs in run["perturbed"])
        for ours, theirs in run["stats"]:
            assert ours["kept_fraction"] == theirs["kept_fraction"]
            assert ours["perturbation_norm"] == pytest.approx(theirs["perturbation_norm"], rel=1e-6)
    assert all(rank[name]["max_param_diff"] == ranks[0][name]["max_param_diff"] for rank in ranks)


@pytest.mark.parametrize("name", [*TRAINING, "zsharp_mixed"])
def test_collectives_per_step(ranks, name):
    """ZSharp's Z-score and magnitude masks: 3 collectives in the ascent; the random mask, mask="none" and the
    other methods: 1. The second step: 1 (the non-finite check, so that every rank skips alike)."""
    ascent = 3 if name in THREE_ROUNDS else 1
    for rank in ranks:
        for step in rank[name]["collectives"]:
            assert len(step) == ascent + 1
            assert [call for call, _ in step[ascent:]] == ["all_reduce"]


def test_non_finite_first_pass_on_one_rank_skips_the_step_on_all(ranks):
    for rank in ranks:
        run = rank["zsharp_nan_first"]
        assert run["perturbed"] == [[True, True], [False, False], [True, True]]
        assert run["max_param_diff"] <= 1e-6 and all(run["masks_equal"])
        assert len(run["collectives"][1]) == 1  # the first round finds it: no more collectives


def test_non_finite_second_pass_on_one_rank_skips_the_base_step_on_all(ranks):
    for rank in ranks:
        run = rank["zsharp_nan_second"]
        assert run["max_param_diff"] <= 1e-6 and run["finite"]


@pytest.mark.parametrize("name", ["checkpoint_zsharp", "checkpoint_fsam"])
def test_resume_from_a_sharded_checkpoint_continues_identically(ranks, name):
    """torch.distributed.checkpoint of the sharded model and optimizer (what Accelerate saves under FSDP2): the
    resumed run is bit-identical. The optimizer's state holds the base's moments (and Friendly-SAM's EMA)."""
    for rank in ranks:
        assert rank[name]["identical"]
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(rank[name]["state_keys"])
    assert "sam_momentum" in ranks[0]["checkpoint_fsam"]["state_keys"]


# --- one process -----------------------------------------------------------------------------------------------------


def test_friendly_sam_state_dict_carries_its_momentum():
    """The gradient EMA travels in the plain torch state (with its "started" flag) and is restored."""
    from reference import mlp, two_pass

    torch.manual_seed(0)
    model = mlp()
    optimizer = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    state = optimizer.state_dict()
    assert all(float(entry["sam_momentum_started"]) == 0 for entry in state["state"].values())
    for seed in range(2):
        two_pass(model, optimizer, seed)
    restored = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert set(restored.momentum) == set(optimizer.momentum)
    assert all(torch.equal(restored.momentum[p], m) for p, m in optimizer.momentum.items())
    assert not any("sam_momentum" in entry for entry in restored.state.values())
    assert math.isfinite(sum(float(m.sum()) for m in restored.momentum.values()))


# --- ZSharpTrainer and accelerate_step under Accelerate's FSDP2 --------------------------------------------------


@pytest.fixture(scope="module")
def trainer_ranks(tmp_path_factory) -> list[dict]:
    return run_worker(WORKER, 2, tmp_path_factory.mktemp("fsdp_trainer"), mode="trainer")


def one_process(path: Path, model: TinyNet | None = None, **overrides) -> tuple[torch.Tensor, list[dict]]:
    """ZSharpTrainer on one process (batch 8): its parameters and training logs."""
    model = TinyNet() if model is None else model
    args = tiny_args(str(path), **{"logging_steps": 1, **overrides})
    trainer = ZSharpTrainer(model=model, args=args, train_dataset=TinyData())
    trainer.train()
    return flat(model), [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("sync", {}),
        ("clip_interval", {"max_grad_norm": 0.5, "sam_interval": 2}),
        ("fsam", {"sam": "fsam"}),
    ],
)
def test_trainer_matches_one_process_on_the_global_batch(trainer_ranks, tmp_path, name, overrides):
    """2 ranks x batch 2 x accumulation 2 under FSDP2 == 1 process x batch 8 (the DDP test's tolerance; measured
    <= 3e-8), with the default sam_sync_ascent=False turned into the synced ascent, the optimizer stepping on
    float32 DTensor shards, and the same logged ascent statistics."""
    params, logs = one_process(tmp_path, **overrides)
    for rank in trainer_ranks:
        run = rank[name]
        assert (
            run["sync_ascent"]
            and run["param_types"] == ["DTensor"]
            and run["param_dtypes"] == ["torch.float32"]
        )
        torch.testing.assert_close(torch.tensor(run["params"]), params, rtol=1e-5, atol=1e-6)
        assert len(run["logs"]) == len(logs)
        for ours, theirs in zip(run["logs"], logs):
            assert ours.get("sam_kept_fraction") == theirs.get("sam_kept_fraction")
            if "sam_perturbation_norm" in theirs:
                norm = theirs["sam_perturbation_norm"]
                assert ours["sam_perturbation_norm"] == pytest.approx(norm, rel=1e-6)


def test_trainer_bf16_under_fsdp2(trainer_ranks, tmp_path):
    """bf16 (Accelerate's FSDP2 mixed precision): the optimizer still sees float32 shards; within bf16 rounding
    (2^-8 relative in the forward, times lr 1e-2 over 4 steps: <= 1e-3) of one process with bf16 autocast."""
    params, _ = one_process(tmp_path, bf16=True)
    for rank in trainer_ranks:
        assert rank["bf16"]["param_dtypes"] == ["torch.float32"]
        torch.testing.assert_close(torch.tensor(rank["bf16"]["params"]), params, rtol=0, atol=1e-3)


def test_non_finite_gradients_on_one_rank_skip_the_step_on_all(trainer_ranks, tmp_path):
    """Rank 1's first pass of step 1 overflows: every rank skips that step and counts it; as one process whose
    batch overflows there."""
    poisoned = TinyNet()
    poisoned.poison = {3}
    params, _ = one_process(tmp_path, poisoned, per_device_train_batch_size=8, max_steps=3, logging_steps=3)
    for rank in trainer_ranks:
        torch.testing.assert_close(torch.tensor(rank["skip"]["params"]), params, rtol=1e-5, atol=1e-6)
        assert rank["skip"]["logs"][-1]["sam_skipped_steps"] == 1


def test_trainer_resumes_from_a_sharded_checkpoint_identically(trainer_ranks):
    """SHARDED_STATE_DICT checkpoint (model and optimizer through torch.distributed.checkpoint) at step 2 of 4,
    with dropout: the resumed run ends bit-identical to the straight one. FULL_STATE_DICT (whole model and
    optimizer state on rank 0; Friendly-SAM here, whose gradient EMA is in that state) too."""
    for rank in trainer_ranks:
        assert rank["resumed"]["params"] == rank["straight"]["params"]
        assert {"optimizer_0", "pytorch_model_fsdp_0"} <= set(rank["checkpoint_files"])
        assert rank["full_resumed"]["params"] == rank["full_straight"]["params"]
    assert {"optimizer.bin", "pytorch_model_fsdp.bin"} <= set(trainer_ranks[0]["full_checkpoint_files"])


def test_accelerate_step_under_fsdp2_matches_one_process(trainer_ranks):
    model = TinyNet()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for batch in TinyData().batches(8)[:3]:

        def closure(batch=batch):
            loss = model(**batch)["loss"]
            loss.backward()
            return loss

        optimizer.step(closure)
    for rank in trainer_ranks:
        torch.testing.assert_close(torch.tensor(rank["accelerate_step"]), flat(model), rtol=1e-5, atol=1e-6)


def test_the_cli_trains_under_accelerate_launch_with_the_sample_fsdp2_config(tmp_path):
    """`accelerate launch --config_file examples/accelerate_fsdp2.yaml` (2 CPU processes) running hf-zsharp-train
    on the paper's ResNet-20: it trains, leaves the process group, and saves a model that records its own code (not
    FSDP2's wrapper class, which lives in torch) and loads. (fp32 here: under the sample's bf16 policy FSDP2
    gives BatchNorm bf16 weights beside float32 running statistics, which torch's batch_norm refuses on the CPU;
    the paper's convnets would need BatchNorm sharded apart with a float32 policy.)"""
    from transformers import AutoModelForImageClassification

    out = tmp_path / "cli"
    out.mkdir()
    accelerate = [Path(sys.executable).with_name("accelerate"), "launch", "--config_file", CONFIG]
    run_worker(
        WORKER, 2, out, "cli", [*map(str, accelerate), "--num_processes", "2", "--mixed_precision", "no"]
    )
    run = out / "run"
    config = json.loads((run / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForImageClassification"]
        == "cifar_resnet.CifarResNetForImageClassification"
    )
    assert not list(run.glob("_fsdp*.py"))
    model = AutoModelForImageClassification.from_pretrained(run, trust_remote_code=True)
    assert any(
        "sam_kept_fraction" in log
        for log in json.loads((run / "trainer_state.json").read_text())["log_history"]
    )
    assert sum(p.numel() for p in model.parameters()) > 0
