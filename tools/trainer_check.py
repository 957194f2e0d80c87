"""`blt-dist train` end to end on this machine's device: the GPU day-one check, and its CPU twin.

    python tools/trainer_check.py OUT [--device cuda|cpu] [--quick]

Each check is a real `python -m blt_dist.cli` process (one rank; on CUDA the process group is
NCCL, so every collective of the loop runs on it), on a synthetic word corpus prepared here:

    zero{0,1,3}-{blt,bpe}   bf16 runs of the tiny configs: finite losses, checkpoints, export
    nan                     an injected NaN step (BLT_FAULTS): skipped, the run finishes
    resume                  SIGKILL after step 3, rerun: the metrics repeat the straight run bit
                            for bit (train.deterministic=true: deterministic GPU kernels)
    export-eval             `blt-dist export` of a run, then `blt-dist eval` on its export
    cpu-vs-device           fp32 BPE, first steps' losses on this device and on the CPU agree
    mfu-{blt,bpe}           the trainer's logged MFU, 125M configs at 8 KB per sample (CUDA only)

Writes OUT/trainer-check.json (every check: ok, numbers, log file) and prints one line per
check; exits 1 if any failed. `--quick` (the CPU twin that CI runs) keeps the runs that a CPU
can afford: the ZeRO runs of the tiny BLT only, and no MFU rows.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space "
         "naïve café Straße привет мир 東京 データ ünïcödé").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checker:
    def __init__(self, out: Path, device: str):
        self.out, self.device, self.results = out, device, []
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self, device: str, extra: dict | None = None) -> dict:
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WANDB_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if device == "cpu":
            env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        return {**env, **(extra or {})}

    def cli(self, name: str, args: list[str], env: dict | None = None, device: str | None = None,
            stdout: Path | None = None) -> subprocess.CompletedProcess:
        """Runs `python -m blt_dist.cli ARGS`, its output in logs/NAME.log (stdout in `stdout` if given)."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as f, open(stdout or os.devnull, "w") as out:
            done = subprocess.run([sys.executable, "-m", "blt_dist.cli", *args], cwd=REPO,
                                  env=self.env(device or self.device, env), stdout=out if stdout else f,
                                  stderr=f if stdout else subprocess.STDOUT, timeout=900)
        done.log = log
        return done

    def record(self, name: str, ok: bool, **facts) -> bool:
        self.results.append({"check": name, "ok": bool(ok), **facts})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
        return ok


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def make_corpus(root: Path) -> tuple[Path, Path]:
    """A prepared byte dataset of word documents (multi-byte UTF-8 included) and its BPE tokenizer."""
    from blt_dist.data.prepare import prepare
    from blt_dist.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    for ctype in ("prose", "code"):
        (root / "in" / ctype).mkdir(parents=True, exist_ok=True)
        for i in range(200):
            text = " ".join(rng.choice(WORDS, rng.integers(20, 400)))
            (root / "in" / ctype / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    prepare([root / "in"], root / "ds", val_fraction=0.1, progress=False)
    train_tokenizer(root / "ds", root / "tok.model", vocab_size=400)
    return root / "ds", root / "tok.model"


def family_args(family: str, ds: Path, tok: Path) -> list[str]:
    common = [f"data.train={ds}", f"data.val={ds}", "train.micro_batch_size=2", "log.every=1",
              "train.eval_bytes=4000", "data.num_workers=0"]
    if family == "blt":
        return ["configs/blt/tiny.yaml", *common, "data.patching.mode=space", "data.byte_capacity=256",
                "data.patches_per_sample=96"]
    return ["configs/bpe/tiny.yaml", *common, f"data.tokenizer={tok}", "model.vocab_size=400",
            "data.tokens_per_sample=64"]


def finite(records: list[dict]) -> bool:
    return bool(records) and all(np.isfinite([r["loss"], r["grad_norm"]]).all() for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if visible")
    parser.add_argument("--quick", action="store_true", help="the CPU twin's subset (see the module docstring)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Checker(out, device)
    started = time.perf_counter()
    ds, tok = make_corpus(out / "corpus")
    runs = out / "runs"

    # -- bf16 on each ZeRO stage, both families
    families = ("blt",) if args.quick else ("blt", "bpe")
    for family in families:
        for zero in (0, 1, 3):
            name = f"zero{zero}-{family}"
            run_dir = runs / name
            done = check.cli(name, ["train", *family_args(family, ds, tok), "train.dtype=bf16", "train.max_steps=6",
                                    f"parallel.zero_stage={zero}", "checkpoint.every=3", f"run.dir={run_dir}"])
            records = train_records(run_dir)
            val = [r["val_bpb"] for r in metrics(run_dir) if "val_bpb" in r]
            check.record(name, done.returncode == 0 and finite(records) and len(records) == 6 and bool(val)
                         and (run_dir / "export" / "model.safetensors").is_file(),
                         rc=done.returncode, final_loss=records[-1]["loss"] if records else None,
                         val_bpb=val[-1] if val else None, log=str(done.log))

    # -- an injected NaN step is skipped and the run finishes
    family = families[-1]
    run_dir = runs / "nan"
    done = check.cli("nan", ["train", *family_args(family, ds, tok), "train.dtype=bf16", "train.max_steps=4",
                             "parallel.zero_stage=1", f"run.dir={run_dir}"], {"BLT_FAULTS": "nan_at_steps=2"})
    text = done.log.read_text()
    check.record("nan", done.returncode == 0 and "non-finite loss; update skipped" in text,
                 rc=done.returncode, log=str(done.log))

    # -- SIGKILL after step 3 and a rerun: bit for bit the straight run
    resume_args = ["train", *family_args("blt", ds, tok), "train.dtype=bf16", "train.max_steps=6",
                   "parallel.zero_stage=1", "checkpoint.every=2", "train.deterministic=true"]
    straight, killed = runs / "straight", runs / "killed"
    first = check.cli("resume-straight", [*resume_args, f"run.dir={straight}"])
    kill = check.cli("resume-killed", [*resume_args, f"run.dir={killed}"], {"BLT_FAULTS": "kill_after_step=3"})
    again = check.cli("resume-resumed", [*resume_args, f"run.dir={killed}"])
    keys = ("step", "loss", "grad_norm", "data_digest", "lr")
    want = [tuple(r[k] for k in keys) for r in train_records(straight)]
    got = [tuple(r[k] for k in keys) for r in train_records(killed)]
    check.record("resume", first.returncode == 0 and kill.returncode != 0 and again.returncode == 0
                 and len(want) == 6 and got == want, killed_rc=kill.returncode,
                 differing_steps=[w[0] for w, g in zip(want, got) if w != g], log=str(again.log))

    # -- export and eval from the command line
    export_dir = out / "export"
    exported = check.cli("export", ["export", str(runs / "zero1-blt"), "--out", str(export_dir)])
    evaluated = check.cli("eval", ["eval", "--model", str(export_dir), "--data", str(ds), "--json"],
                          stdout=out / "eval.json")
    try:
        bpb = json.loads((out / "eval.json").read_text())["bpb"]
    except (ValueError, KeyError):
        bpb = None
    check.record("export-eval", exported.returncode == 0 and evaluated.returncode == 0 and bpb is not None
                 and np.isfinite(bpb), bpb=bpb, log=str(evaluated.log))

    # -- the first steps' losses on this device and on the CPU (fp32: the same arithmetic)
    if device != "cpu":
        agree_args = ["train", *family_args("bpe", ds, tok), "train.dtype=fp32", "train.max_steps=3"]
        on_device = check.cli("agree-device", [*agree_args, f"run.dir={runs / 'agree-device'}"])
        on_cpu = check.cli("agree-cpu", [*agree_args, f"run.dir={runs / 'agree-cpu'}"], device="cpu")
        a, b = (np.array([r["loss"] for r in train_records(runs / n)]) for n in ("agree-device", "agree-cpu"))
        gap = float(np.abs(a - b).max() / np.abs(b).max()) if len(a) == len(b) == 3 else None
        check.record("cpu-vs-device", on_device.returncode == 0 and on_cpu.returncode == 0 and gap is not None
                     and gap < 1e-3, max_relative_loss_gap=gap, device_losses=a.tolist(), cpu_losses=b.tolist())

    # -- MFU as the trainer logs it, 125M configs at 8 KB per sample
    if device == "cuda" and not args.quick:
        for family, extra in (("blt", ["data.patching.mode=space"]),
                              ("bpe", [f"data.tokenizer={tok}", "model.vocab_size=400"])):
            run_dir = runs / f"mfu-{family}"
            done = check.cli(f"mfu-{family}", ["train", f"configs/{family}/125m.yaml", f"data.train={ds}",
                                               f"data.val={ds}", *extra, "train.dtype=bf16", "train.max_steps=30",
                                               "log.every=5", "train.eval_bytes=2000", "checkpoint.every=0",
                                               f"run.dir={run_dir}"])
            mfu = [r["mfu"] for r in train_records(run_dir)][1:]  # the first window holds compile/warm-up
            check.record(f"mfu-{family}", done.returncode == 0 and bool(mfu), mfu=max(mfu) if mfu else None,
                         log=str(done.log))

    ok = all(r["ok"] for r in check.results)
    summary = {"device": device, "ok": ok, "seconds": round(time.perf_counter() - started, 1),
               "torch": torch.__version__, "checks": check.results}
    if device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name()
    (out / "trainer-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'all ok' if ok else 'FAILED'}: {len(check.results)} checks in {summary['seconds']} s on {device}; "
          f"{out / 'trainer-check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
