"""`python -m nextstep_runtime convert SRC DST --weights bf16|fp8|int4`: repack a model folder (repack.py)."""

from __future__ import annotations

import argparse
import sys

from ..weights.repack import CONVERTED_FORMATS, convert_folder
from .help import HelpFormatter


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", formatter_class=HelpFormatter, help="rewrite a model folder's weights as bf16, fp8 or int4 (loads faster, converts nothing)",
        description="Write DST, a model folder that loads as it is: SRC's weights with the decoder's linear layers "
                    "stored as WEIGHTS (everything else bf16), shards of at most 5 GB, config, tokenizer and vae/ "
                    "copied. Load it with the same weights setting (fp8 / int4).")
    parser.add_argument("source", metavar="SRC", help="NextStep model folder (as downloaded)")
    parser.add_argument("destination", metavar="DST", help="new folder to write (must not exist or be empty)")
    parser.add_argument("--weights", choices=list(CONVERTED_FORMATS), required=True,
                        help="storage of the decoder's linear weights")


def run(args: argparse.Namespace) -> None:
    convert_folder(args.source, args.destination, args.weights)
    sys.stderr.write(f"wrote {args.destination} ({args.weights} weights)\n")
