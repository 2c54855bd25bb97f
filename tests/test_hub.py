"""Hub names: short names resolve, a hub model is pinned to a commit (offline: the cache's), errors are one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import fingerprint_model
from pascal_moe.models import SUPPORTED
from pascal_moe.models import hub

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "models" / "qwen3-moe-tiny"
SHA_MAIN, SHA_V2 = "a" * 40, "b" * 40


def fake_cache(cache: Path, repo: str = "pascal-test/tiny-moe") -> Path:
    """A hub cache holding `repo` at two commits (refs main and v2), as `hf download` lays it out."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for ref, sha in (("main", SHA_MAIN), ("v2", SHA_V2)):
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
        shutil.copytree(TINY, root / "snapshots" / sha, ignore=shutil.ignore_patterns("*.log", "README.md"))
    return root


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    fake_cache(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub._resolve.cache_clear(), hub.pinned_commit.cache_clear()
    yield cache
    hub._resolve.cache_clear(), hub.pinned_commit.cache_clear()


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_short_names_resolve_case_insensitively() -> None:
    assert hub.hub_id("Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert hub.hub_id("qwen3-30b-a3b") == "Qwen/Qwen3-30B-A3B"
    assert hub.hub_id("MIXTRAL-8x7b-instruct") == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert hub.hub_id("gpt-oss-20b") == "openai/gpt-oss-20b"
    assert hub.hub_id("some-org/some-model") == "some-org/some-model"  # a hub id passes through
    assert len({k.lower() for k in hub.HUB_IDS}) == len(hub.HUB_IDS)  # no two names differ only in case
    assert all(v.count("/") == 1 for v in hub.HUB_IDS.values())
    assert {"qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe", "mixtral", "olmoe", "gpt_oss"} == set(SUPPORTED)


def test_offline_empty_cache_is_one_line_naming_the_hub_id(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pascal_moe.cli", "profile", "--model", "Qwen3-30B-A3B", "--out", str(tmp_path / "o")],
        env=_env(tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "Qwen/Qwen3-30B-A3B" in lines[0] and "hf download Qwen/Qwen3-30B-A3B" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_offline_hub_model_pins_the_cached_commit_and_revision_reaches_the_fingerprint(offline_cache: Path) -> None:
    ref = hub.resolve("pascal-test/tiny-moe")
    assert (ref.source, ref.commit, ref.is_local) == ("pascal-test/tiny-moe", SHA_MAIN, False)
    assert hub.resolve("pascal-test/tiny-moe", "v2").commit == SHA_V2
    main, v2 = fingerprint_model("pascal-test/tiny-moe"), fingerprint_model("pascal-test/tiny-moe", "v2")
    assert main != v2  # a new upstream revision is a new model for resume
    assert fingerprint_model("pascal-test/tiny-moe", "main") == main
    with pytest.raises(PascalError, match=r"revision v3.*hf download pascal-test/tiny-moe --revision v3"):
        hub.resolve("pascal-test/tiny-moe", "v3")


def test_local_directory_is_untouched(tmp_path: Path) -> None:
    ref = hub.resolve(str(TINY))
    assert (ref.source, ref.commit, ref.load_revision) == (str(TINY), None, None)
    before = fingerprint_model(str(TINY))
    copy = tmp_path / "m"
    shutil.copytree(TINY, copy)
    assert fingerprint_model(str(copy)) == before  # content, not the path, as before
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"vocab_size"', '"vocab_size" '))
    assert fingerprint_model(str(copy)) != before
    with pytest.raises(PascalError, match="applies to hub models"):
        hub.resolve(str(TINY), "v2")
    with pytest.raises(PascalError, match="has no config.json"):
        hub.resolve(str(tmp_path / "absent"))


def test_cached_hub_model_loads_offline_at_its_revision(tmp_path: Path) -> None:
    """The loaders read the pinned commit from the cache (a subprocess: the hub libraries read HF_HOME at import)."""
    fake_cache(tmp_path / "hf" / "hub")
    code = (
        "from pascal_moe.models.loading import load_model, load_tokenizer\n"
        "m = load_model('pascal-test/tiny-moe', 'cpu', 'float32', revision='v2')\n"
        "t = load_tokenizer('pascal-test/tiny-moe', 'v2')\n"
        "print(m.config.model_type, m.config._commit_hash, t.eos_token_id is not None)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(tmp_path / "hf"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["qwen3_moe", SHA_V2, "True"]
    assert r.stderr.count("offline: using the local cache") == 1  # said once, though two loaders resolved it
