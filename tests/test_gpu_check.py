"""scripts/gpu_check.py, the figures a session lent a GPU records, runs end to end on the CPU (small settings)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: it imports its neighbours
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--device", "cpu", "--small", "--json", str(tmp_path / "gpu.json")])
    printed = capsys.readouterr().out
    for title in (
        "Ascent (first_step)",
        "ZSharpTrainer throughput",
        "Data path on the device",
        "goal <= 1.5",
    ):
        assert title in printed
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
