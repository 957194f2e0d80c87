"""`blt-dist train CONFIG [overrides]`: the training entry point.

The DeepSpeed loop is delivered by issue 5; until then only `--dry-run` (print the resolved
config) works, and a real run says it is not built instead of pretending.
"""
from __future__ import annotations

import argparse
import sys

from blt_dist.config import add_config_arguments, config_from_args, to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    print("blt-dist train: the training loop is not built yet (issue 5); use --dry-run to check a config", file=sys.stderr)
    return 3
