"""A release install works: the wheel and sdist built from this checkout hold every file of the package, the
installed copy's entry points run from outside the source tree, and floors.txt pins the floors pyproject declares."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hf_zsharp
from hf_zsharp import __main__ as module_entry

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "hf_zsharp"
needs_source = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file() or not SOURCE.is_dir(),
    reason="needs the source checkout (this copy of the tests runs against an installed wheel)",
)
# The libraries whose lowest supported versions floors.txt pins and CI's floors stage installs.
FLOORED = ("transformers", "accelerate", "datasets", "huggingface_hub", "timm", "evaluate")


def _package_files() -> list[str]:
    """Every file of hf_zsharp/ in the source tree, as a path inside a wheel (`hf_zsharp/...`)."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in SOURCE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def _checkout_copy(destination: Path) -> Path:
    """The files git tracks (a clean checkout), or the tree without build outputs when there is no git."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
        for name in filter(None, listed.decode().split("\0")):
            source, target = ROOT / name, destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(source.readlink())
            elif source.is_file():
                shutil.copy2(source, target)
    else:
        ignore = shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs")
        shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built from a clean copy of the checkout by setuptools' PEP 517 backend."""
    source = _checkout_copy(tmp_path_factory.mktemp("checkout") / "src")
    out = tmp_path_factory.mktemp("dist")
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between the two
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, check=True, capture_output=True)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


@needs_source
def test_wheel_holds_every_file_of_the_package(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in _package_files() if name not in names]
    assert not missing, f"the wheel lacks {missing} (a new file must be added to git)"
    assert "hf_zsharp/templates/model_card.md" in names and "hf_zsharp/metrics/accuracy/accuracy.py" in names


@needs_source
def test_sdist_holds_every_file_of_the_package(built):
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [name for name in [*_package_files(), "pyproject.toml", "README.md"] if name not in names]
    assert not missing, f"the sdist lacks {missing}"


@needs_source
def test_wheel_version_is_the_package_version(built):
    wheel, _ = built
    assert wheel.name.startswith(f"hf_zsharp-{hf_zsharp.__version__}-")


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@needs_source
@pytest.mark.slow
def test_installed_wheel_runs_its_entry_points_from_another_directory(built, tmp_path):
    wheel, _ = built
    bare = tmp_path / "bare"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(bare),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**_clean_env(), "PYTHONPATH": str(bare), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import hf_zsharp; print(hf_zsharp.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(bare), where
    commands = {
        "hf-zsharp-train": [str(bare / "bin" / "hf-zsharp-train"), "--help"],
        "hf-zsharp-reproduce": [str(bare / "bin" / "hf-zsharp-reproduce"), "--help"],
        "python -m hf_zsharp": [sys.executable, "-m", "hf_zsharp", "--help"],
        "python -m hf_zsharp train": [sys.executable, "-m", "hf_zsharp", "train", "--help"],
    }
    for name, command in commands.items():
        result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{name} --help: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout, name


def test_module_entry_lists_its_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_entry.main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_module_entry_without_a_command_prints_usage_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_entry.main([])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().out


def test_module_entry_names_an_unknown_command_and_the_closest_one():
    with pytest.raises(SystemExit, match=r"unknown command 'trian' \(did you mean 'train'\?\)"):
        module_entry.main(["trian", "--help"])


def _declared_floors() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    floors = {}
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        if match:
            floors[match[1].lower().replace("-", "_")] = match[2]
    return floors


@needs_source
def test_floors_file_pins_exactly_the_declared_floors():
    """CI's floors stage installs floors.txt: it must pin what pyproject declares, so lowering a floor tests it."""
    declared = _declared_floors()
    pinned = {}
    for line in (ROOT / "floors.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name.strip().lower().replace("-", "_")] = version.strip()
    for library in FLOORED:
        assert library in declared, f"pyproject.toml declares no floor for {library}"
        assert pinned.get(library) == declared[library], (
            f"floors.txt pins {library}=={pinned.get(library)} but pyproject.toml declares >={declared[library]}"
        )
    assert all(pinned[name] == declared.get(name) for name in pinned), (
        "floors.txt pins a version pyproject does not declare"
    )


def test_an_older_torch_is_refused_in_one_line_at_import_of_the_optimizers():
    code = (
        "import torch; from torch.torch_version import TorchVersion; torch.__version__ = TorchVersion('2.5.1');"
        "import hf_zsharp.optim"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert (
        "ImportError: hf_zsharp's sharded statistics" in last
        and "needs torch>=2.6, found torch 2.5.1" in last
    )


def test_the_installed_torch_passes_the_check():
    from hf_zsharp._compat import TORCH_FLOOR, require_torch

    require_torch("everything", TORCH_FLOOR)
