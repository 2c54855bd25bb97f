"""Hub names: short names of the supported MoE families, and a hub model resolved to one commit.

Why: `--model Qwen3-30B-A3B` used to reach the hub as a repository id and come back as a 404, and a
hub model's fingerprint was its id string, so a resumed run never noticed a new upstream revision.
Here a short name becomes its hub id (one table, below), `--revision` picks a branch, tag or commit,
and `resolve` pins the model to the commit it names: loaders read that commit, fingerprints hash it.

Offline (`HF_HUB_OFFLINE=1`) the commit comes from the local cache (and the run says so once); a model
that is neither a directory, nor cached offline, nor found online is one line naming the hub id, the
revision and the command that fetches it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pascal_moe.errors import PascalError

# Short name -> hub id, for the families pascal_moe/models/ has adapters for (model_type in brackets).
# Not here: DeepSeek-V2(-Lite) (deepseek_v2 has no adapter) and custom-code models (Kimi-K2).
HUB_IDS: dict[str, str] = {
    # qwen3_moe
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
    "Qwen3-30B-A3B-Base": "Qwen/Qwen3-30B-A3B-Base",
    "Qwen3-30B-A3B-Instruct-2507": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "Qwen3-30B-A3B-Thinking-2507": "Qwen/Qwen3-30B-A3B-Thinking-2507",
    "Qwen3-Coder-30B-A3B-Instruct": "Qwen/Qwen3-Coder-30B-A3B-Instruct",
    "Qwen3-235B-A22B": "Qwen/Qwen3-235B-A22B",
    "Qwen3-235B-A22B-Instruct-2507": "Qwen/Qwen3-235B-A22B-Instruct-2507",
    # qwen2_moe
    "Qwen1.5-MoE-A2.7B": "Qwen/Qwen1.5-MoE-A2.7B",
    "Qwen1.5-MoE-A2.7B-Chat": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
    "Qwen2-57B-A14B": "Qwen/Qwen2-57B-A14B",
    "Qwen2-57B-A14B-Instruct": "Qwen/Qwen2-57B-A14B-Instruct",
    # deepseek_v3
    "DeepSeek-V3": "deepseek-ai/DeepSeek-V3",
    "DeepSeek-V3-0324": "deepseek-ai/DeepSeek-V3-0324",
    "DeepSeek-R1": "deepseek-ai/DeepSeek-R1",
    "Moonlight-16B-A3B": "moonshotai/Moonlight-16B-A3B",
    "Moonlight-16B-A3B-Instruct": "moonshotai/Moonlight-16B-A3B-Instruct",
    # glm4_moe (the deepseek adapter: sigmoid routing with a correction bias)
    "GLM-4.5": "zai-org/GLM-4.5",
    "GLM-4.5-Air": "zai-org/GLM-4.5-Air",
    # mixtral
    "Mixtral-8x7B": "mistralai/Mixtral-8x7B-v0.1",
    "Mixtral-8x7B-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "Mixtral-8x7B-Instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "Mixtral-8x22B": "mistralai/Mixtral-8x22B-v0.1",
    "Mixtral-8x22B-Instruct": "mistralai/Mixtral-8x22B-Instruct-v0.1",
    # olmoe
    "OLMoE-1B-7B": "allenai/OLMoE-1B-7B-0924",
    "OLMoE-1B-7B-0924": "allenai/OLMoE-1B-7B-0924",
    "OLMoE-1B-7B-Instruct": "allenai/OLMoE-1B-7B-0924-Instruct",
    "OLMoE-1B-7B-0924-Instruct": "allenai/OLMoE-1B-7B-0924-Instruct",
    # gpt_oss
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}
_BY_LOWER = {k.lower(): v for k, v in HUB_IDS.items()}
console = Console(stderr=True)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as the loaders read it: a local directory, or a hub id pinned to one commit."""

    source: str  # the directory path or the hub id given to from_pretrained
    revision: str | None = None  # what the user asked for (branch, tag or commit); None = main
    commit: str | None = None  # the commit a hub model resolved to; None for a directory

    @property
    def is_local(self) -> bool:
        return self.commit is None

    @property
    def load_revision(self) -> str | None:
        """The revision to pass to from_pretrained: the pinned commit, so model and tokenizer agree."""
        return self.commit


def looks_local(model: str) -> bool:
    """A path the user means (exists, starts like a path, or has more than one slash), not a hub id."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1


def hub_id(model: str) -> str:
    """The hub id of a short name (case-insensitive); any other string unchanged."""
    return _BY_LOWER.get(model.lower(), model)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def fetch_hint(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"`hf download {repo}{rev}` (or `huggingface-cli download {repo}{rev}`)"


def missing(repo: str, revision: str | None, why: str) -> PascalError:
    """The one line for a model that cannot be found: id, revision, why, and how to fetch it."""
    return PascalError(
        f"model {repo} (revision {revision or 'main'}) {why}: fetch it with {fetch_hint(repo, revision)}, "
        "or pass a model directory"
    )


def cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit of `repo` at `revision` in the local hub cache (its config.json's snapshot), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, "config.json", revision=revision)
    except ValueError:  # not a valid repository id
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def resolve(model: str, revision: str | None = None) -> ModelRef:
    """`model` as a directory, or as a hub id pinned to a commit (a short name becomes its hub id)."""
    return _resolve(model, revision or None, offline())


@functools.lru_cache(maxsize=64)
def _resolve(model: str, revision: str | None, is_offline: bool) -> ModelRef:
    if looks_local(model):
        p = Path(model).expanduser()
        if not (p / "config.json").is_file():
            raise PascalError(f"model not found: {model} has no config.json (pass a model directory or a hub id)")
        if revision:
            raise PascalError(f"--revision {revision} applies to hub models; {model} is a local directory")
        return ModelRef(model)
    repo = hub_id(model)
    if is_offline:
        commit = cached_commit(repo, revision)
        if commit is None:
            raise missing(repo, revision, "is not in the local hub cache and HF_HUB_OFFLINE=1 is set")
        _say_offline()
        return ModelRef(repo, revision, commit)
    return ModelRef(repo, revision, _online_commit(repo, revision))


@functools.lru_cache(maxsize=64)
def pinned_commit(model: str, revision: str | None = None) -> str | None:
    """The commit a hub model resolves to, or None (a directory, or a name the hub and cache do not know).

    For records (fingerprints, manifests) of a model already loaded: the load said what was wrong.
    """
    if looks_local(model):
        return None
    try:
        return resolve(model, revision).commit
    except PascalError:
        return None


@functools.lru_cache(maxsize=1)
def _say_offline() -> None:
    """Said once per process: an offline run reads only what the cache holds."""
    console.print("[yellow]offline:[/] using the local cache (HF_HUB_OFFLINE=1)", highlight=False)


def _online_commit(repo: str, revision: str | None) -> str:
    """The commit `revision` names on the hub; the cached one, said so, when the hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        sha = HfApi().model_info(repo, revision=revision, timeout=10).sha
    except GatedRepoError as e:
        raise PascalError(
            f"model {repo} is gated: accept its terms on https://huggingface.co/{repo} and log in (`hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise PascalError(f"model {repo} has no revision {revision!r}: pass a branch, tag or commit it has") from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise missing(repo, revision, "is not on the hub (404)") from e
    except Exception as e:  # noqa: BLE001 - unreachable hub: the cache may still hold it
        commit = cached_commit(repo, revision)
        if commit is None:
            raise missing(repo, revision, f"is not cached and the hub is unreachable ({type(e).__name__})") from e
        console.print(f"[yellow]hub unreachable[/] ({type(e).__name__}): using the cached {repo}@{commit[:12]}")
        return commit
    if not sha:
        raise missing(repo, revision, "has no commit on the hub")
    return sha
