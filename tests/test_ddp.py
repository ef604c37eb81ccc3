"""ZSharpTrainer under DDP: two CPU processes over gloo, launched with torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_training import TinyData, TinyNet, flat, tiny_args

from hf_zsharp.trainer import ZSharpTrainer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("tiny_training.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=out
    )
    assert proc.returncode == 0, failure_report(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """torchrun's exit code, the first stderr lines that matter (warnings dropped), and its summary at the end."""
    noise = ("Warning", "warnings.warn", "warn(", "*****", "Setting OMP_NUM_THREADS")
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not any(n in line for n in noise)]
    head, tail = lines[:60], lines[60:][-20:]
    return "\n".join(
        [f"torchrun exited with {proc.returncode}; stderr without warnings:", *head]
        + (["[...]", *tail] if tail else [])
        + ["stdout tail:", proc.stdout[-2000:]]
    )


def test_synced_ascent_matches_one_process_on_the_global_batch(ranks, tmp_path):
    # 2 ranks x batch 2 x accumulation 2 (all-reduced ascent) == 1 process x batch 8.
    model = TinyNet()
    ZSharpTrainer(model=model, args=tiny_args(str(tmp_path)), train_dataset=TinyData()).train()
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["sync"]["params"]), flat(model), rtol=1e-5, atol=1e-6)


def test_synced_ascent_all_reduces_the_first_pass(ranks):
    flags = ranks[0]["sync"]["flags"]
    # Per step: micro-batch 1 (no_sync, Trainer's accumulation), micro-batch 2 (synced: the ascent's gradient
    # is global), then the second pass of both (only the last one synced).
    assert flags["forward"] == [False, True, False, True] * 4
    assert flags["backward"] == flags["forward"]


def test_local_ascent_runs_the_whole_first_pass_under_no_sync(ranks):
    for rank in ranks:
        flags = rank["local"]["flags"]
        # First passes of both micro-batches without all-reduce, forward and backward; second pass synced last.
        assert flags["forward"] == [False, False, False, True] * 3
        assert flags["backward"] == flags["forward"]


def test_local_ascent_keeps_replicas_identical(ranks):
    first, second = (rank["local"] for rank in ranks)
    assert first["checksums"] == second["checksums"]
    assert first["params"] == second["params"]
    assert first["calls_per_step"] == [4, 4, 4]


def test_one_replica_overflowing_skips_the_step_on_all(ranks):
    first, second = (rank["skip"] for rank in ranks)
    assert first["checksums"] == second["checksums"]
    # Step 1 (0-based) was skipped everywhere: no second pass on either rank, parameters unchanged.
    assert first["calls_per_step"] == second["calls_per_step"] == [2, 1, 2]
    assert first["checksums"][1] == first["checksums"][0]
    assert first["checksums"][2] != first["checksums"][1]


def test_non_finite_second_pass_on_one_replica_skips_the_step_on_all(ranks):
    first, second = (rank["skip_second_pass"] for rank in ranks)
    # The second pass is all-reduced: rank 1's non-finite gradients reach both ranks, which both skip step 1.
    assert first["checksums"] == second["checksums"]
    assert first["calls_per_step"] == second["calls_per_step"] == [2, 2, 2]
    assert first["checksums"][1] == first["checksums"][0]
    assert first["checksums"][2] != first["checksums"][1]
    assert all(math.isfinite(x) for x in first["params"])
    assert first["skipped_steps"] == second["skipped_steps"] == 1


def test_skips_are_counted_on_every_replica(ranks):
    assert [rank["skip"]["skipped_steps"] for rank in ranks] == [1, 1]
