"""The `pascal` CLI surface and the settings layer it is built on.

Why: users meet the tool through `pascal --help`, error lines and `--config` files; a
traceback, a wrapped multi-line error or a YAML typo silently ignored are bugs.
Subprocess tests run the installed `pascal` entry point (cli.main turns PascalError
into one red line and exit code 2); settings tests use typer's CliRunner on a tiny app.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pascal_moe.errors import PascalError
from pascal_moe.settings import add_command, from_mapping, option

REPO = Path(__file__).resolve().parents[1]
PASCAL = Path(sys.executable).with_name("pascal")
COMMANDS = ("profile", "synthesize", "balance", "build-calib", "quantize", "eval", "models", "export-calib")
BUNDLED = {
    "data/models/qwen3-moe-tiny": ("qwen3_moe", "softmax"),
    "data/models/deepseek-v3-tiny": ("deepseek_v3", "sigmoid"),
}


def pascal(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the installed entry point as a user would, in an 80-column terminal."""
    if not PASCAL.exists():
        pytest.skip(f"{PASCAL} is not installed (pip install -e .)")
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run([str(PASCAL), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, f"error is not one line:\n{err}"
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err
    return err


# --------------------------------------------------------------------------- the entry point


def test_help_lists_every_command() -> None:
    proc = pascal("--help")
    assert proc.returncode == 0, proc.stderr
    words = set(proc.stdout.replace("│", " ").split())
    missing = [c for c in COMMANDS if c not in words]
    assert not missing, f"--help does not list {missing}"


def test_models_json_lists_both_bundled_models() -> None:
    absent = [p for p in BUNDLED if not (REPO / p / "config.json").exists()]
    if absent:
        pytest.skip(f"bundled models not saved yet: {absent}")
    proc = pascal("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in json.loads(proc.stdout)}
    for path, (arch, routing) in BUNDLED.items():
        assert path in rows, f"{path} not listed"
        assert (rows[path]["architecture"], rows[path]["routing"]) == (arch, routing)
        assert rows[path]["experts"] == 16


def test_missing_required_option_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(pascal("profile", cwd=tmp_path), "--model", "--out")


def test_nonexistent_model_dir_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    err = assert_one_line_error(pascal("profile", "--model", str(missing), "--out", str(tmp_path / "out")))
    assert str(missing) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_kernel_incompatible_scheme_is_one_line(tmp_path: Path) -> None:
    """int5-g7 used to end in a 121-line RuntimeError from the grouped expert kernel; the preflight stops it."""
    model = REPO / "data" / "models" / "qwen3-moe-tiny"
    proc = pascal("profile", "--model", str(model), "--out", str(tmp_path / "out"), "--scheme", "int5-g7")
    assert_one_line_error(proc, "int5-g7", "133", "multiple of 4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["profile", "export-calib"])
def test_uncreatable_output_dir_is_one_line(command: str, tmp_path: Path) -> None:
    args = {
        "profile": ["--model", str(REPO / "data" / "models" / "qwen3-moe-tiny")],
        "export-calib": ["--calib", str(tmp_path), "--format", "jsonl"],
    }[command]
    assert_one_line_error(pascal(command, *args, "--out", "/proc/x/y"), "/proc/x/y")


def test_every_stage_command_has_dry_run() -> None:
    for command in ("profile", "synthesize", "balance", "build-calib", "quantize", "eval", "export-calib"):
        proc = pascal(command, "--help")
        assert "--dry-run" in proc.stdout, command


def test_unknown_yaml_key_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: some/model\nout: out\nseq_lenn: 64\n")
    assert_one_line_error(pascal("profile", "--config", str(cfg), cwd=tmp_path), "seq_lenn")


# --------------------------------------------------------------------------- settings: YAML + flags


@dataclass
class DemoConfig:
    model: str = option(help="model directory")
    seq_len: int = option(512, "tokens per sample")
    batch_size: int = option(8, "samples per batch")
    sensitivity: bool = option(True, "measure sensitivity")
    tags: list[str] = option([], "free tags")


def demo_app(seen: list[DemoConfig]) -> typer.Typer:
    app = typer.Typer()
    add_command(app, "demo", DemoConfig, seen.append, "a demo stage")
    add_command(app, "other", DemoConfig, seen.append, "a second command keeps `demo` a subcommand")
    return app


def invoke(tmp_path: Path, yaml_text: str | None, *flags: str) -> DemoConfig:
    seen: list[DemoConfig] = []
    args = ["demo", *flags]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(textwrap.dedent(yaml_text))
        args += ["--config", str(tmp_path / "c.yaml")]
    result = CliRunner().invoke(demo_app(seen), args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return seen[0]


def test_flags_alone(tmp_path: Path) -> None:
    cfg = invoke(tmp_path, None, "--model", "m", "--seq-len", "64")
    assert (cfg.model, cfg.seq_len, cfg.batch_size, cfg.sensitivity, cfg.tags) == ("m", 64, 8, True, [])


def test_yaml_fills_what_flags_leave_out(tmp_path: Path) -> None:
    cfg = invoke(tmp_path, "model: m\nseq-len: 64\nbatch_size: 3\nsensitivity: false\ntags: [a, b]\n")
    assert (cfg.model, cfg.seq_len, cfg.batch_size, cfg.sensitivity, cfg.tags) == ("m", 64, 3, False, ["a", "b"])


def test_flag_wins_over_yaml(tmp_path: Path) -> None:
    cfg = invoke(
        tmp_path,
        "model: m\nseq-len: 64\nbatch_size: 3\nsensitivity: false\n",
        "--seq-len",
        "128",
        "--sensitivity",
        "--model",
        "flag-model",
    )
    assert (cfg.model, cfg.seq_len, cfg.batch_size, cfg.sensitivity) == ("flag-model", 128, 3, True)


def test_flag_equal_to_default_still_wins(tmp_path: Path) -> None:
    cfg = invoke(tmp_path, "model: m\nseq_len: 64\n", "--seq-len", "512")
    assert cfg.seq_len == 512


def test_yaml_section_named_after_the_command(tmp_path: Path) -> None:
    cfg = invoke(tmp_path, "demo:\n  model: m\n  seq_len: 32\nother:\n  seq_len: 999\n")
    assert (cfg.model, cfg.seq_len) == ("m", 32)


def test_unknown_yaml_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(PascalError) as err:
        invoke(tmp_path, "model: m\nbatch_sise: 3\n")
    msg = str(err.value)
    assert "batch_sise" in msg and "\n" not in msg and "batch_size" in msg


def test_missing_required_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(PascalError, match="--model"):
        invoke(tmp_path, "seq_len: 3\n")
    with pytest.raises(PascalError, match="mapping"):
        invoke(tmp_path, "- just\n- a list\n")
    with pytest.raises(PascalError, match="not found"):
        invoke(tmp_path, None, "--model", "m", "--config", str(tmp_path / "absent.yaml"))


def test_from_mapping_directly() -> None:
    cfg = from_mapping(DemoConfig, {"model": "m", "batch-size": 2}, "test")
    assert (cfg.model, cfg.batch_size, cfg.seq_len) == ("m", 2, 512)
    with pytest.raises(PascalError, match="nope"):
        from_mapping(DemoConfig, {"model": "m", "nope": 1}, "test")


# --------------------------------------------------------------------------- the repo-leak guard itself


def _run_guarded(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run one test under a copy of tests/conftest.py inside a scratch git repo."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), repo / "tests" / "conftest.py")
    (repo / ".gitignore").write_text("__pycache__/\n")
    (repo / "tests" / "test_inner.py").write_text(textwrap.dedent(body))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    env = {**os.environ, "PASCAL_LEAK_CHECK": "fail"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_inner.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_leak_guard_fails_a_test_that_writes_into_the_repo(tmp_path: Path) -> None:
    proc = _run_guarded(
        tmp_path,
        """
        from pathlib import Path

        def test_clean(tmp_path):
            (tmp_path / "ok.txt").write_text("fine")

        def test_leaky():
            (Path(__file__).parents[1] / "leak.txt").write_text("oops")
    """,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 passed, 1 error" in out, out  # the leaky test fails at teardown; the clean one does not
    assert "ERROR tests/test_inner.py::test_leaky" in out and "leak.txt" in out
    assert "test_clean -" not in out
