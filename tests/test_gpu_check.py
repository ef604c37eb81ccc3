"""scripts/gpu_check.py, the figures a session lent a GPU records, runs end to end on the CPU (small settings)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path, capsys):
    results = load_script().main(["--device", "cpu", "--small", "--json", str(tmp_path / "gpu.json")])
    printed = capsys.readouterr().out
    for title in (
        "Two-pass step",
        "Ascent (first_step)",
        "ZSharpTrainer throughput",
        "Data path on the device",
        "goal <= 1.5",
    ):
        assert title in printed
    assert [(row["model"], row["method"]) for row in results["two_pass"]] == [
        (model, method) for model in ("resnet20", "vit_tiny") for method in ("adamw", "sam", "zsharp")
    ]
    for row in results["two_pass"]:
        assert row["step_ms"] > 0 and 0 < row["optimizer_share"] < 1
        assert row["kernels_per_step"] > row["optimizer_kernels"] > 0
        # One host read per two-pass step with a fused base optimizer; none for AdamW alone.
        assert row["host_reads"] == (0 if row["method"] == "adamw" else 1)
    assert [(row["model"], row["dtype"]) for row in results["ascent"]] == [
        (model, dtype) for model in ("test_vit", "test_resnet") for dtype in ("fp32", "bf16")
    ]
    for row in results["ascent"]:
        assert row["zsharp_ms"] > 0 and row["sam_ms"] > 0
        # SAM keeps a full copy of the parameters; ZSharp ~5 % of the entries plus their int32 positions.
        assert row["sam_held"] == 1.0 and 0 < row["zsharp_held"] < row["sam_held"]
    assert [row["sam"] for row in results["trainer"]] == ["none", "sam", "zsharp"]
    assert all(row["images_per_s"] > 0 for row in results["trainer"] + results["data"])
    assert (tmp_path / "gpu.json").is_file()


def test_gpu_check_fails_when_a_figure_is_missing(monkeypatch, tmp_path):
    script = load_script()
    monkeypatch.setattr(script, "check_data", lambda *args: [{"path": "x", "batch": 1, "images_per_s": None}])
    monkeypatch.setattr(script, "check_trainer", lambda *args: [{"sam": "none", "images_per_s": 1.0}])
    monkeypatch.setattr(script, "check_two_pass", lambda *args: [{"model": "m", "step_ms": 1.0}])
    with pytest.raises(SystemExit) as raised:
        script.main(["--device", "cpu", "--small"])
    assert raised.value.code == 1
