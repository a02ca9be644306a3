"""Fetching a model repo's runtime files into a plain model folder, resumable byte by byte and never over a user's file.

What a repo holds for the runtime is listed once (`list_runtime_files`, also what `download` fetches), then
`plan_fetch` compares it with the folder under `download --to`'s rule (download_folder.py: files an earlier
download or fetch of this model wrote are kept, any other model file there is refused by name, never overwritten),
and counts each missing file's partial transfer. `check_free_space` refuses before the first byte when the disk
cannot take what is still to come. `fetch_files` then transfers the missing files with huggingface_hub's own HTTP
client (its headers, token and retries): each into `.cache/huggingface/download/<file>.<etag>.incomplete`, appended to where an
earlier (cancelled or failed) run stopped, checked against the Hub's sha256 when it gives one, and moved into place
with huggingface_hub's download record beside it (so `download --to` and huggingface_hub treat it as theirs).
`config.json` comes last: a folder holding it is complete, which is what the loaders list.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import NextStepError
from .download_folder import DOWNLOAD_RECORDS, check_no_mixing, check_target_folder
from .hub import NEVER_FETCHED, RUNTIME_FILES

CONFIG_FILE = "config.json"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 16 * 1024 * 1024

ByteProgress = Callable[[int, int], None]
"""Called with (bytes arrived, bytes in all) as a fetch goes on; raising from it stops the fetch, keeping what
arrived for the next one."""


def human_size(size: int) -> str:
    """Bytes as a person reads them in a message: GB above a gigabyte, else MB."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


@dataclass(frozen=True)
class RepoFiles:
    """The files of `repo` at `commit` that the runtime reads, with their sizes in bytes."""

    repo: str
    commit: str
    sizes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


NETWORK_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
"""The HTTP stacks huggingface_hub versions use; their connection errors (an unknown host, a dropped connection)
are not all OSErrors."""


def _from_network_library(exc: BaseException) -> bool:
    return type(exc).__module__.partition(".")[0] in NETWORK_LIBRARIES


@contextlib.contextmanager
def hub_failures(repo: str, revision: str | None, again: str, doing: str = "downloading") -> Iterator[None]:
    """Turn what can go wrong talking to the Hub into one-line NextStepErrors: an unknown repo or revision, an
    invalid revision, a network or disk failure while `doing` it (then `again`, what continues, is named). Anything
    else (a bug, a cancel) passes unchanged."""
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo}@{revision}" if revision else repo
    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NextStepError(f"{where} was not found on the Hugging Face Hub ({type(exc).__name__}); check the repo id "
                            f"and revision") from None
    except HFValidationError as exc:  # a revision the Hub would refuse
        raise NextStepError(f"{where}: {exc}") from None
    except Exception as exc:
        if not isinstance(exc, (HfHubHTTPError, OSError)) and not _from_network_library(exc):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NextStepError(f"{doing} {repo} failed ({reason}); {again}") from None


def list_runtime_files(repo: str, revision: str | None = None) -> RepoFiles:
    """Ask the Hub which runtime files `repo` holds at `revision` (default: main); a repo without a top-level
    config.json is not a NextStep model and is refused."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    files = filter_repo_objects(info.siblings or [], allow_patterns=RUNTIME_FILES, ignore_patterns=NEVER_FETCHED,
                                key=lambda sibling: sibling.rfilename)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in files}
    if CONFIG_FILE not in sizes:
        raise NextStepError(f"{repo} has no {CONFIG_FILE} at its top level; it is not a NextStep model repo")
    return RepoFiles(repo, info.sha, sizes)


@dataclass(frozen=True)
class FetchPlan:
    """What fetching `files` into `folder` still has to transfer: the missing files (config.json last) and the bytes
    earlier runs already brought of them."""

    files: RepoFiles
    folder: Path
    missing: tuple[str, ...]
    arrived: int

    @property
    def to_fetch(self) -> int:
        """Bytes still to come over the network (and to be written to the disk)."""
        return sum(self.files.sizes[name] for name in self.missing) - self.arrived


def _partial_path(folder: Path, name: str, etag: str) -> Path:
    return folder / DOWNLOAD_RECORDS / f"{name}.{etag}.incomplete"


def _partial_files(folder: Path, name: str) -> list[Path]:
    """Partial transfers of `name` kept in `folder` (any version); none when the folder does not exist yet."""
    return sorted(_partial_path(folder, name, "x").parent.glob(f"{Path(name).name}.*.incomplete"))


def plan_fetch(files: RepoFiles, folder: Path) -> FetchPlan:
    """Compare the repo's files with `folder` under download --to's rule (download_folder.py: only files an earlier
    download or fetch of this same model wrote may be there, so nothing of the user's is overwritten and no two models
    mix; refused by name otherwise); the files not there yet are missing, their partial transfers counted as
    arrived."""
    check_target_folder(folder)
    check_no_mixing(folder, files.repo, files.commit, list(files.sizes))
    missing = sorted((name for name in files.sizes if not (folder / name).exists()),
                     key=lambda name: name == CONFIG_FILE)
    arrived = sum(max((part.stat().st_size for part in _partial_files(folder, name)), default=0) for name in missing)
    return FetchPlan(files, folder, tuple(missing), arrived)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_space(folder: Path) -> tuple[Path, int]:
    """(the nearest existing folder, the bytes free on its disk) for a folder that may not exist yet."""
    where = _existing_parent(folder)
    return where, shutil.disk_usage(where).free


def check_free_space(plan: FetchPlan) -> None:
    """Refuse before any byte is fetched when the disk holding the folder has less free space than is still to come."""
    where, free = free_space(plan.folder)
    if plan.to_fetch > free:
        raise NextStepError(f"fetching {plan.files.repo} into {plan.folder} needs {human_size(plan.to_fetch)} of free "
                            f"disk space, but {where} has {human_size(free)} free; free some space (or put the model "
                            f"folders on a larger disk with extra_model_paths.yaml), then run again")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar_class(report: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub's http_get that reports every chunk written (also with progress bars off)."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            report(int(n or 0))
            return super().update(n)

    return ReportingBar


def _fetch_file(files: RepoFiles, folder: Path, name: str, report: Callable[[int], None]) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub._local_folder import get_local_download_paths, write_download_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    metadata = get_hf_file_metadata(hf_hub_url(files.repo, name, revision=files.commit))
    etag = metadata.etag or files.commit
    paths = get_local_download_paths(folder, name)
    partial = _partial_path(folder, name, etag)
    for stale in _partial_files(folder, name):  # a transfer of an older version of this file cannot be continued
        if stale != partial:
            stale.unlink()
    with open(partial, "ab") as file:
        http_get(metadata.location, file, resume_size=file.tell(), headers=build_hf_headers(),
                 expected_size=metadata.size, tqdm_class=_progress_bar_class(report))
    if SHA256.match(etag) and _sha256_of(partial) != etag:
        partial.unlink()
        raise NextStepError(f"{name} of {files.repo} arrived damaged (its sha256 is not the Hub's); run again to "
                            f"fetch it anew")
    os.replace(partial, paths.file_path)
    write_download_metadata(folder, name, files.commit, etag)


def fetch_files(plan: FetchPlan, progress: ByteProgress) -> Path:
    """Transfer the plan's missing files into its folder (config.json last), reporting bytes as they arrive; the
    folder, complete. An exception (from the network, or from `progress` on a cancel) keeps what arrived."""
    total, done = plan.files.total, plan.files.total - plan.to_fetch
    progress(done, total)

    def report(chunk: int) -> None:
        nonlocal done
        done += chunk
        progress(done, total)

    plan.folder.mkdir(parents=True, exist_ok=True)
    for name in plan.missing:
        _fetch_file(plan.files, plan.folder, name, report)
    return plan.folder


def fetch_model(repo: str, folder: Path, progress: ByteProgress, announce: Callable[[str], None]) -> Path:
    """Fetch what the runtime reads of `repo` (main) into `folder`, continuing what earlier runs brought: the listing,
    the user's files and the free disk space are checked before the first byte; `announce` gets one line saying what
    comes and where. The complete folder."""
    with hub_failures(repo, None, again="run again to continue where it stopped"):
        plan = plan_fetch(list_runtime_files(repo), folder)
        check_free_space(plan)
        announce(f"fetching {repo} ({plan.files.commit[:12]}): {len(plan.missing)} of {len(plan.files.sizes)} files, "
                 f"{human_size(plan.to_fetch)} to come of {human_size(plan.files.total)}, into {folder}")
        return fetch_files(plan, progress)


def fetch_summary(repo: str, folder: Path) -> dict:
    """What fetching `repo` into `folder` would do, for the Model Loader's panel: the repo's runtime bytes, those still
    to come, the disk's free bytes, and the problem that would stop it (unreachable Hub, a user's file in the way),
    JSON-ready. Asks the Hub for the listing; transfers nothing."""
    summary = {"repo": repo, "folder": str(folder), "total_bytes": None, "to_fetch_bytes": None,
               "free_bytes": free_space(folder)[1], "problem": None}
    try:
        with hub_failures(repo, None, again="its size is unknown until the Hub answers", doing="listing"):
            plan = plan_fetch(list_runtime_files(repo), folder)
    except NextStepError as exc:
        return {**summary, "problem": str(exc)}
    fits = plan.to_fetch <= summary["free_bytes"]
    return {**summary, "total_bytes": plan.files.total, "to_fetch_bytes": plan.to_fetch,
            "problem": None if fits else f"needs {human_size(plan.to_fetch)} of free disk space, "
                                         f"{human_size(summary['free_bytes'])} free there"}
