"""`blt-dist <command>`: the one entry point.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `--help` stays fast (no torch import).
A command with a Slurm form (`blt-dist entropies --slurm`) is wired here, the one place below
launch/ that knows it: the data plane's command knows nothing of Slurm; launch/ adds its flags to
the same parser and runs the command when `--slurm` is given.
Errors a user can fix (bad config, missing file, corrupt shard) are `UserError`s: one line on
stderr, a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from blt_dist.errors import UserError

# name -> (module, one-line help). Modules define add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("blt_dist.corpus.build", "build the default real-text corpus offline (Debian/PyPI packages)"),
    "prepare": ("blt_dist.data.prepare", "raw text (dirs, .txt, .jsonl) -> MDS byte shards with a train/val split"),
    "train": ("blt_dist.training.loop", "train an entropy model, BLT or BPE baseline with DeepSpeed"),
    "entropies": ("blt_dist.data.entropies", "run an entropy model over byte shards -> entropy shards"),
    "calibrate": ("blt_dist.data.calibrate", "find the entropy threshold that hits a target mean patch size"),
    "tokenizer": ("blt_dist.data.tokenizer", "train a sentencepiece BPE tokenizer on byte shards"),
    "verify": ("blt_dist.data.verify", "check a dataset: indexes, shard hashes, documents; --stamp adds hashes to an old one"),
    "export": ("blt_dist.interop.hf_export",
               "consolidate a (ZeRO-sharded or pipelined) checkpoint into one safetensors file; --hf: for transformers"),
    "import-hf": ("blt_dist.interop.hf_import",
                  "a transformers LlamaForCausalLM or BltForCausalLM directory -> a project model export"),
    "eval": ("blt_dist.evaluation.evaluate", "bits per byte of a checkpoint on shards or text files"),
    "patch": ("blt_dist.data.patch_cli", "show how a text is cut into patches"),
    "generate": ("blt_dist.evaluation.generate", "sample bytes from a trained model"),
    "flops": ("blt_dist.flops", "parameters and training FLOPs per byte per component; matched BPE shape; fixed-inference match (--patch-size)"),
    "launch": ("launch.slurm", "submit a training run to Slurm (submitit)"),
    "sweep": ("launch.sweep", "a scaling sweep (sizes x families x FLOP budgets x seeds) on Slurm or locally; results.csv"),
    "compare": ("blt_dist.evaluation.compare", "BLT vs BPE vs byte-level report: bits per byte at equal training FLOPs"),
    "demo": ("blt_dist.demo", "the main job on the bundled default data"),
    "memory": ("blt_dist.bench.zero_memory", "per-rank training state of real DeepSpeed engines under ZeRO-0..3, for a config"),
    "bench": ("blt_dist.bench.suite", "compute benchmarks (peaks, training bytes/s and MFU, peers, data path, memory) vs targets"),
}

# command -> the launch/ module with its Slurm form: add_slurm_arguments(parser), run_slurm(args)
SLURM_FORMS: dict[str, str] = {"entropies": "launch.entropy_array"}


def _module_for(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="blt-dist",
        description="Distributed pretraining of Byte Latent Transformers and FLOP-matched BPE baselines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module_for(name).add_arguments(sp)
            if name in SLURM_FORMS:
                importlib.import_module(SLURM_FORMS[name]).add_slurm_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    args = build_parser(command).parse_args(argv)

    run: Callable[[argparse.Namespace], int] = _module_for(args.command).run
    if args.command in SLURM_FORMS and args.slurm:
        run = importlib.import_module(SLURM_FORMS[args.command]).run_slurm
    try:
        return int(run(args) or 0)
    except UserError as err:
        print(f"blt-dist {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"blt-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
