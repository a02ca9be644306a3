"""Hugging Face repo ids as model sources: resolved from the local Hugging Face cache (never the network),
listed from it cheaply, and the selection of files the runtime reads (what `download` fetches).

The cache is huggingface_hub's own (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), so
models fetched by diffusers, transformers or `hf download` are found where those tools put them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NextStepError

RUNTIME_FILES = [
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "vae/*",
]
"""Patterns (huggingface_hub's fnmatch rules) of every file the runtime reads in a model repo."""
NEVER_FETCHED = ["*.py", "*.pyc"]
"""The repos' Python code is never used (no trust_remote_code), so it is never downloaded either (some repos ship
compiled `__pycache__` files too, as INCModel/NextStep-1.1-W4A16-AutoRound does under vae/)."""

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
"""`org/name`, optionally `@revision` (a branch, tag or commit)."""
DOWNLOAD_HINT = "python -m nextstep_runtime download {repo}"


def repo_id_problem(repo: str) -> str | None:
    """Why `repo` (without a revision) is not a valid Hugging Face repo id, by huggingface_hub's own rules (no `--`
    or `..`, at most 96 characters, ...), or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "@" in repo:
        return "give a revision with --revision, not after @"
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        return str(exc)
    return None if REPO_ID.match(repo) else "a repo id is org/name of letters, digits, '-', '_' and '.'"


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `name` is a valid Hugging Face repo id, optionally `@revision`, else None
    (so no message ever suggests fetching an id the Hub would refuse)."""
    match = REPO_ID.match(name)
    if match is None or repo_id_problem(match["repo"]) is not None:
        return None
    return match["repo"], match["revision"]


def cache_root() -> Path:
    """Where huggingface_hub keeps its cache, read from its settings at call time."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of `repo` at `revision` (default: main), without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=RUNTIME_FILES,
                                      ignore_patterns=NEVER_FETCHED))
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        where = f"{repo}@{revision}" if revision else repo
        hint = DOWNLOAD_HINT.format(repo=repo) + (f" --revision {revision}" if revision else "")
        raise NextStepError(f"{where} is not in the Hugging Face cache {cache_root()} ({exc}); download it with "
                            f"`{hint}`") from None


def resolve_model_source(source: str | Path) -> Path:
    """A model folder on disk as given, else a repo id (`org/name[@revision]`) from the Hugging Face cache."""
    path = Path(source)
    if path.is_dir():
        return path
    repo = parse_repo_id(str(source))
    if repo is None:
        problem = repo_id_problem(str(source).partition("@")[0]) if str(source).count("/") == 1 else None
        raise NextStepError(f"model folder {source} does not exist" + (
            f", and it is not a valid Hugging Face repo id ({problem})" if problem else ""))
    try:
        return cached_snapshot(*repo)
    except NextStepError as exc:
        raise NextStepError(f"model folder {source} does not exist, and as a Hugging Face repo id: {exc}") from None


@dataclass(frozen=True)
class CacheScan:
    """What the Hugging Face cache holds, read from its directory layout alone (cheap enough to run whenever ComfyUI
    lists the loader's choices)."""

    repos: dict[str, Path]
    """Repo id -> snapshot folder (of main, else the newest revision) of every model repo that has one."""
    problems: dict[str, str]
    """The cache itself, or a repo id, -> why it was skipped (a broken entry never hides the good ones)."""


def _snapshot(storage: Path) -> Path | None:
    """The snapshot folder of main, else the newest one, of one cached repo (`models--org--name`); None when it has
    none yet. OSError when the repo folder cannot be read; NextStepError for a broken snapshot."""
    snapshots = storage / "snapshots"
    main = storage / "refs" / "main"
    if main.is_file():
        commit = main.read_text(encoding="utf-8").strip()
        candidates = [snapshots / commit]
    else:
        candidates = sorted(snapshots.iterdir(), key=lambda path: path.lstat().st_mtime,
                            reverse=True) if snapshots.is_dir() else []
    for candidate in candidates:
        if candidate.is_dir():  # False for a dangling link or a link loop, which pathlib does not raise for
            return candidate
    if candidates and (candidates[0].exists() or candidates[0].is_symlink()):
        raise NextStepError(f"its snapshot {candidates[0]} is not a folder (a dangling or looping link?); download "
                            f"the repo again")
    return None


def scan_model_cache() -> CacheScan:
    """Every model repo in the cache, each read on its own: one broken entry (a snapshot that is a dangling link or
    a loop, a repo folder this user may not read) is reported and skipped, and a cache path that is not a folder
    is reported, not raised."""
    root = cache_root()
    repos, problems = {}, {}
    try:
        if root.exists() and not root.is_dir():
            return CacheScan({}, {str(root): "the Hugging Face cache path (HF_HUB_CACHE or HF_HOME) is not a folder"})
        storages = sorted(root.iterdir()) if root.is_dir() else []
    except OSError as exc:
        return CacheScan({}, {str(root): f"cannot be read ({exc.strerror or exc})"})
    for storage in storages:
        kind, _, name = storage.name.partition("--")
        if kind != "models" or not name:
            continue
        repo = name.replace("--", "/")
        try:
            snapshot = _snapshot(storage)
        except OSError as exc:
            problems[repo] = f"{storage} cannot be read ({exc.strerror or exc})"
        except NextStepError as exc:
            problems[repo] = str(exc)
        else:
            if snapshot is not None:
                repos[repo] = snapshot
    return CacheScan(repos, problems)

