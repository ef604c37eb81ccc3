"""scripts/train_no_trainer.py under torchrun on the CPU: real DDP over gloo, equal to one process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_zsharp.models import build_model

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parents[1] / "scripts" / "train_no_trainer.py"
# Three two-pass steps with the ascent all-reduced, on fixed (un-augmented) batches of 8 per process.
RUN = ["--cpu", "--sync_ascent", "--no_augmentation", "--max_steps", "3", "--batch_size", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> tuple[list[dict], list[dict]]:
    """Wait for `process`; returns its printed step logs and results."""
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert "terminate called" not in stderr  # gloo aborting at exit: the process group was not ended
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [line for line in lines if "loss" in line], [line for line in lines if "num_processes" in line]


def test_torchrun_on_the_cpu_is_ddp_and_matches_one_process_accumulating(tmp_path):
    two = start([*TORCHRUN, str(SCRIPT), *RUN, "--output_dir", "two"], tmp_path)
    one = start(
        [sys.executable, str(SCRIPT), *RUN, "--gradient_accumulation_steps", "2", "--output_dir", "one"],
        tmp_path,
    )
    (two_logs, two_results), (one_logs, one_results) = finish(two), finish(one)
    # One DDP job, not two single-process trainings (each of which printed its own result).
    assert [(r["steps"], r["num_processes"], r["replicas_in_sync"]) for r in two_results] == [(3, 2, True)]
    assert [(r["steps"], r["num_processes"]) for r in one_results] == [(3, 1)]
    # The logged loss is the global batch's, the mean over both processes (printed to 4 decimals: 1e-4 apart).
    assert [log["loss"] for log in two_logs] == pytest.approx([log["loss"] for log in one_logs], abs=2e-4)
    # Bit-identical weights. Both runs see the same 16 images per step (seedable sampler), BatchNorm normalises
    # each 8 alone in both, and one thread per process runs the same kernels. DDP averages the two gradients as
    # (g0 + g1) / 2, accumulation adds g0 / 2 + g1 / 2: halving is exact, so both round once, the same way.
    # (BatchNorm's running statistics differ: DDP keeps rank 0's.)
    two_weights = load_file(tmp_path / "two" / "model.safetensors")
    one_weights = load_file(tmp_path / "one" / "model.safetensors")
    for name, _ in build_model("resnet20", 10).named_parameters():
        assert torch.equal(two_weights[name], one_weights[name]), name


def test_the_cpu_is_the_default_without_a_cuda_gpu():
    spec = importlib.util.spec_from_file_location("train_no_trainer", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args([]).cpu is not torch.cuda.is_available()
    assert script.parse_args(["--no-cpu"]).cpu is False
