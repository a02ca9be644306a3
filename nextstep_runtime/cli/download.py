"""`python -m nextstep_runtime download REPO [--to DIR] [--revision REV]`: fetch what the runtime reads.

Only config, weights (and their index), tokenizer files and `vae/` are fetched, never the repos' Python
code. huggingface_hub does the transfer: files already complete are not fetched again and a transfer cut
off mid-file continues from where it stopped. Without `--to` the files go into the Hugging Face cache, where
`--model REPO` and the ComfyUI loader find them. With `--to`, the folder must not hold model files of anyone
else's (weights/download_folder.py): nothing of the user's is overwritten and no two models are mixed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NextStepError
from ..weights.download_folder import check_no_mixing, check_target_folder
from ..weights.hub import NEVER_FETCHED, RUNTIME_FILES, repo_id_problem


def add_parser(commands) -> None:
    parser = commands.add_parser("download", help="fetch a NextStep model from the Hugging Face Hub",
                                 description="Fetch the files the runtime reads (config, weights, tokenizer, "
                                             "vae/; never *.py) from the Hugging Face Hub.")
    parser.add_argument("repo", help="Hugging Face repo id, e.g. stepfun-ai/NextStep-1.1")
    parser.add_argument("--to", metavar="DIR", help="write a plain model folder here instead of the Hugging Face cache")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")


def _human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


NETWORK_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
"""The HTTP stacks huggingface_hub versions use; their connection errors (an unknown host, a dropped connection)
are not all OSErrors."""


def _from_network_library(exc: BaseException) -> bool:
    return type(exc).__module__.partition(".")[0] in NETWORK_LIBRARIES


def run(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        filter_repo_objects,
    )

    problem = repo_id_problem(args.repo)
    if problem is not None:
        raise NextStepError(f"{args.repo!r} is not a Hugging Face repo id like stepfun-ai/NextStep-1.1 ({problem})")
    if args.to:
        check_target_folder(Path(args.to))
    try:
        info = HfApi().model_info(args.repo, revision=args.revision, files_metadata=True)
        files = list(filter_repo_objects(info.siblings or [], allow_patterns=RUNTIME_FILES,
                                         ignore_patterns=NEVER_FETCHED, key=lambda sibling: sibling.rfilename))
        if not any(sibling.rfilename == "config.json" for sibling in files):
            raise NextStepError(f"{args.repo} has no config.json at its top level; it is not a NextStep model repo")
        if args.to:
            check_no_mixing(Path(args.to), args.repo, info.sha, [sibling.rfilename for sibling in files])
        total = sum(sibling.size or 0 for sibling in files)
        target = args.to or "the Hugging Face cache"
        sys.stderr.write(f"{args.repo} ({info.sha}): fetching {len(files)} files, {_human_size(total)} in all, "
                         f"into {target} (files an earlier download put there are kept)\n")
        folder = snapshot_download(args.repo, revision=args.revision, local_dir=args.to,
                                   allow_patterns=[sibling.rfilename for sibling in files])
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NextStepError(f"{args.repo}{'@' + args.revision if args.revision else ''} was not found on the "
                            f"Hugging Face Hub ({type(exc).__name__}); check the repo id and revision") from None
    except HFValidationError as exc:  # a revision the Hub would refuse
        raise NextStepError(f"{args.repo}{'@' + args.revision if args.revision else ''}: {exc}") from None
    except Exception as exc:
        if not isinstance(exc, (HfHubHTTPError, OSError)) and not _from_network_library(exc):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NextStepError(f"downloading {args.repo} failed ({reason}); run the same command again to continue "
                            f"where it stopped") from None
    sys.stdout.write(f"{folder}\n")
