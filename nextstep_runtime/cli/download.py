"""`python -m nextstep_runtime download REPO [--to DIR] [--revision REV]`: fetch what the runtime reads.

Only config, weights (and their index), tokenizer files and `vae/` are fetched, never the repos' Python
code. huggingface_hub does the transfer: files already complete are not fetched again and a transfer cut
off mid-file continues from where it stopped. Without `--to`, from any folder: into models/nextstep/<name>/ of the
ComfyUI this pack sits in (its first `nextstep` folder, where the loader fetches to), else into the Hugging Face
cache, where `--model REPO` and the ComfyUI loader find them. A folder must not hold model files of anyone else's
(weights/download_folder.py): nothing of the user's is overwritten and no two models are mixed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NextStepError
from ..weights.comfyui_folders import enclosing_comfyui
from ..weights.download_folder import check_no_mixing, check_target_folder
from ..weights.fetch import hub_failures, human_size, list_runtime_files
from ..weights.hub import repo_id_problem


def add_parser(commands) -> None:
    parser = commands.add_parser("download", help="fetch a NextStep model from the Hugging Face Hub",
                                 description="Fetch the files the runtime reads (config, weights, tokenizer, "
                                             "vae/; never *.py) from the Hugging Face Hub.")
    parser.add_argument("repo", help="Hugging Face repo id, e.g. stepfun-ai/NextStep-1.1")
    parser.add_argument("--to", metavar="DIR",
                        help="write a plain model folder here (default: models/nextstep/<name> of the ComfyUI this "
                             "pack sits in; outside a ComfyUI, the Hugging Face cache)")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")


def _comfyui_model_folder(repo: str) -> str | None:
    """models/nextstep/<repo's name> in the first `nextstep` folder of the ComfyUI this pack sits in, or None."""
    install = enclosing_comfyui()
    return None if install is None else str(install.model_folders[0] / repo.rpartition("/")[2])


def run(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    problem = repo_id_problem(args.repo)
    if problem is not None:
        raise NextStepError(f"{args.repo!r} is not a Hugging Face repo id like stepfun-ai/NextStep-1.1 ({problem})")
    args.to = args.to or _comfyui_model_folder(args.repo)
    if args.to:
        check_target_folder(Path(args.to))
    with hub_failures(args.repo, args.revision, again="run the same command again to continue where it stopped"):
        files = list_runtime_files(args.repo, args.revision)
        if args.to:
            check_no_mixing(Path(args.to), args.repo, files.commit, list(files.sizes))
        target = args.to or "the Hugging Face cache"
        sys.stderr.write(f"{args.repo} ({files.commit}): fetching {len(files.sizes)} files, {human_size(files.total)} "
                         f"in all, into {target} (files an earlier download put there are kept)\n")
        folder = snapshot_download(args.repo, revision=args.revision, local_dir=args.to,
                                   allow_patterns=list(files.sizes))
    sys.stdout.write(f"{folder}\n")
