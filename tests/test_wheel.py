"""The built wheel, installed in a fresh virtual environment and run from outside the checkout.

Why: an editable install hides every packaging bug (a module left out of the wheel, data found
through the repository path). This builds the wheel from a copy of the sources, installs it
with --no-deps into a new venv whose dependencies come from the running environment (a .pth
line: nothing is downloaded), and runs the CLI as a user who installed it would:
`pascal --help`, `pascal models` with and without $PASCAL_DATA_DIR, and a real `pascal profile`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "data" / "models" / "qwen3-moe-tiny"
SEED = REPO / "data" / "seed" / "seed.parquet"


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PASCAL_DATA_DIR", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "COLUMNS": "100", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", **env},
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the wheel (bin/pascal); its dependencies resolve to this interpreter's site-packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pascal_moe", src / "pascal_moe", ignore=shutil.ignore_patterns("__pycache__"))
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        tmp,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("pascal_moe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pascal_moe/prompts/analyse.md" in names, "prompts are package data"
    assert not [n for n in names if n.startswith("pascal_moe/bundled/")], "build scripts belong in data/build/"
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    # a plain path line: the running env's own .pth files (our editable install among them) are not processed
    (Path(site) / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip sees the editable pascal-moe through that path and must not uninstall it
    inst = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        tmp,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    where = _run([str(py), "-c", "import pascal_moe; print(pascal_moe.__file__)"], tmp).stdout.strip()
    assert where.startswith(site), f"pascal_moe imported from {where}, not the wheel"
    return env


def test_help_and_models_need_a_data_dir_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    pascal = str(installed / "bin" / "pascal")
    help_ = _run([pascal, "--help"], tmp_path)
    assert help_.returncode == 0 and "build-calib" in help_.stdout, help_.stderr
    bare = _run([pascal, "models"], tmp_path)
    lines = bare.stderr.strip().splitlines()
    assert bare.returncode == 2 and len(lines) == 1 and "PASCAL_DATA_DIR" in lines[0], bare.stderr
    if not (QWEN / "config.json").is_file():
        pytest.skip("bundled models not in this checkout")
    named = _run([pascal, "models", "--json"], tmp_path, PASCAL_DATA_DIR=str(REPO / "data"))
    assert named.returncode == 0, named.stderr
    assert str(QWEN) in named.stdout and "qwen3_moe" in named.stdout


def test_profile_runs_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    if not (QWEN / "model.safetensors").is_file() or not SEED.is_file():
        pytest.skip("bundled model weights or seed corpus not in this checkout")
    res = _run(
        [
            str(installed / "bin" / "pascal"),
            "profile",
            "--model",
            str(QWEN),
            "--data",
            str(SEED),
            "--out",
            "P",
            "--max-samples",
            "16",
            "--seq-len",
            "64",
            "--no-sensitivity",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "P" / "profile.json").is_file() and (tmp_path / "P" / "experts.parquet").is_file()
