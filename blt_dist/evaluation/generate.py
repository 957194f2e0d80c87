"""`blt-dist generate`: sample bytes from a trained BLT, BPE or byte-level model, with KV caches.

    blt-dist generate --model RUN/export --prompt "The cat sat" --max-bytes 200 --temperature 0.8 --top-p 0.95
    blt-dist generate --model RUN/export --prompt-file prompt.bin --greedy --out continuation.bin

Every family decodes one step at a time from caches, so a step costs O(window) (or O(context)
for attention without a window), never a forward pass over the whole sequence:

  BLT    bytes arrive one at a time. The entropy model takes one cached step per byte (its
         sliding window) and gives H of the next position, rounded to float16 as entropy
         shards store it; the IncrementalPatcher decides from it whether the next position
         starts a patch, i.e. whether this byte closes one (a decision at i reads only bytes
         <= i, so generation patches exactly as training did). `BLT.step` then runs the encoder
         (KV cache), pools a closed patch and steps the latent model once per patch (its own
         KV cache), and runs the decoder (KV cache) reading the one patch the byte may read.
         Patching modes without entropies (space, static, byte) need no entropy model.
  BPE    sentencepiece tokens (the export's data.tokenizer) with a token-level KV cache;
         output bytes come from the tokens' pieces (byte fallback pieces are raw bytes).
  bytes  any other CausalLM over the 260 byte ids (the entropy family, byte-level baselines):
         one cached step per byte.

The prompt is a document's start: BOS + prompt bytes (tokens for BPE). Generation stops at EOS
or after --max-bytes bytes (a BPE token crossing the limit is cut). PAD, BOS and the reserved
id are never sampled. Output goes to the terminal with invalid UTF-8 and control characters
escaped; --out FILE gets the raw bytes. tests/test_generate.py checks that the cached logits
equal a full forward pass over the generated sequence (fp32), for every family.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from blt_dist.data.entropies import cached_entropies, check_entropy_source, entropy_dtype_for, load_entropy_model
from blt_dist.data.patching import PatchingRule
from blt_dist.data.tokenizer import UNK, ByteExactTokenizer
from blt_dist.errors import UserError
from blt_dist.model import BLT, CausalLM
from blt_dist.model.weights import WEIGHTS, export_info, load_export
from blt_dist.vocab import BOS_ID, DELIM_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE

PREFILL_CHUNK = 256  # prompt positions per cached forward for the LMs (bounds the [t, t] mask)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. greedy (or temperature 0): the argmax."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens holding >= top_p
    greedy: bool = False
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def next_token_probs(logits: torch.Tensor, sampling: Sampling, banned: list[int]) -> torch.Tensor:
    """The distribution sampled from: banned ids removed, temperature, then top-k and top-p."""
    logits = logits.float().clone()
    logits[banned] = -math.inf
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.numel():
        kept = logits.topk(sampling.top_k).indices  # exactly k ids, even among equal logits
        limited = torch.full_like(logits, -math.inf)
        limited[kept] = logits[kept]
        logits = limited
    probs = logits.softmax(-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely ids
        drop = order[before >= sampling.top_p]  # the most likely id always stays (before = 0)
        probs[drop] = 0
        probs = probs / probs.sum()
    return probs


def choose(logits: torch.Tensor, sampling: Sampling, banned: list[int], generator: torch.Generator) -> int:
    if sampling.is_greedy:
        logits = logits.float().clone()
        logits[banned] = -math.inf
        return int(logits.argmax())
    return int(torch.multinomial(next_token_probs(logits, sampling, banned), 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# Decoders: one per kind of model, all with the same four members
#
#   prefill(prompt: bytes) -> logits [vocab] for the first generated token
#   feed(token: int)       -> logits [vocab] for the token after it
#   token_bytes(token)     -> the raw bytes a token stands for
#   eos_id, banned         -> the id that ends a document; ids never sampled
#
# With record=True every fed position's logits are kept in `logits` (tests compare them).


class ByteLMDecoder:
    """A CausalLM over byte ids (entropy family, byte-level baselines)."""

    eos_id = EOS_ID
    banned = [PAD_ID, BOS_ID, DELIM_ID]

    def __init__(self, model, record: bool = False):
        self.model = model
        self.cache = model.new_cache()
        self.tokens: list[int] = []
        self.record = record
        self.logits: list[torch.Tensor] = []

    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits = self.model.forward_cached(torch.tensor([ids]), self.cache)[0].float()
        self.tokens += ids
        if self.record:
            self.logits += list(logits)
        return logits[-1]

    def encode_prompt(self, prompt: bytes) -> list[int]:
        return [BOS_ID] + [b + OFFSET for b in prompt]

    def prefill(self, prompt: bytes) -> torch.Tensor:
        ids = self.encode_prompt(prompt)
        for first in range(0, len(ids), PREFILL_CHUNK):
            logits = self._forward(ids[first : first + PREFILL_CHUNK])
        return logits

    def feed(self, token: int) -> torch.Tensor:
        return self._forward([token])

    def token_bytes(self, token: int) -> bytes:
        return bytes([token - OFFSET]) if token >= OFFSET else b""


class TokenLMDecoder(ByteLMDecoder):
    """The BPE baseline: sentencepiece tokens (data.tokenizer) and a token-level cache."""

    def __init__(self, model, tokenizer_path: str, record: bool = False):
        super().__init__(model, record)
        self.tokenizer = ByteExactTokenizer(tokenizer_path)
        if self.tokenizer.vocab_size != model.cfg.vocab_size:
            raise UserError(f"{tokenizer_path}: vocabulary {self.tokenizer.vocab_size} != model.vocab_size "
                            f"{model.cfg.vocab_size}; give the model's tokenizer with --tokenizer")
        self.eos_id = self.tokenizer.eos_id
        self.banned = [self.tokenizer.pad_id, self.tokenizer.bos_id, UNK]

    def encode_prompt(self, prompt: bytes) -> list[int]:
        ids, _ = self.tokenizer.encode_document(prompt)
        return ids[:-1].tolist()  # BOS + tokens; the document goes on (no EOS)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode([token])


class BLTDecoder:
    """A BLT with online patching (see the module docstring); `entropy_model` is the entropy
    CausalLM for the entropy modes (None otherwise)."""

    eos_id = EOS_ID
    banned = [PAD_ID, BOS_ID, DELIM_ID]

    def __init__(self, model, cfg, entropy_model=None, record: bool = False, entropy_dtype: str = "fp32"):
        self.model = model
        self.entropy_dtype = entropy_dtype  # the dtype the training entropies were computed in
        self.rule = PatchingRule.from_config(cfg.data.patching)
        if self.rule.needs_entropies and entropy_model is None:
            raise UserError(f"this BLT patches by {self.rule.mode}: it needs its entropy model (--entropy-model)")
        self.patcher = self.rule.incremental()
        self.cache = model.new_cache()
        self.entropy_model = entropy_model if self.rule.needs_entropies else None
        self.entropy_cache = self.entropy_model.new_cache() if self.entropy_model is not None else None
        self.next_entropy: Optional[float] = None  # H of the next position (None before BOS)
        self.next_starts = True  # whether a patch starts at the next position
        self.tokens: list[int] = []
        self.patch_starts: list[bool] = []  # per fed position, from the patcher
        self.entropies: list[float] = []  # H per fed position (0 at BOS)
        self.record = record
        self.logits: list[torch.Tensor] = []

    def _next_entropies(self, tokens: list[int]) -> list[Optional[float]]:
        """H of the position after each of `tokens` (fed in order to the entropy model's cache),
        rounded to float16 as entropy shards store it (the threshold was calibrated on those
        values); None for each when no entropy model is used."""
        if self.entropy_model is None:
            return [self.next_entropy] * len(tokens)

        entropies = cached_entropies(self.entropy_model, torch.tensor([tokens]), self.entropy_cache, self.entropy_dtype)[0]
        return [float(h) for h in entropies.cpu().numpy().astype(np.float16)]

    def _step(self, token: int, next_entropy: Optional[float]) -> torch.Tensor:
        """Feeds `token` to the patcher and the BLT, given the entropy of the position after it."""
        self.patch_starts.append(self.patcher.step(token, self.next_entropy))
        self.entropies.append(self.next_entropy or 0.0)
        self.tokens.append(token)
        self.next_entropy = next_entropy
        self.next_starts = self.patcher.peek(self.next_entropy)
        logits = self.model.step(token, self.next_starts, self.cache)[0, 0].float()
        if self.record:
            self.logits.append(logits)
        return logits

    def feed(self, token: int) -> torch.Tensor:
        return self._step(token, self._next_entropies([token])[0])

    def prefill(self, prompt: bytes) -> torch.Tensor:
        """BOS + the prompt. The entropy model reads the prompt in chunks of PREFILL_CHUNK
        positions (one cached forward each, not one per byte); the patcher and the BLT then
        take the bytes one at a time, as generation does."""
        ids = [BOS_ID] + [b + OFFSET for b in prompt]
        for first in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[first : first + PREFILL_CHUNK]
            for token, next_entropy in zip(chunk, self._next_entropies(chunk)):
                logits = self._step(token, next_entropy)
        return logits

    def token_bytes(self, token: int) -> bytes:
        return bytes([token - OFFSET]) if token >= OFFSET else b""

    def layout_starts(self, n_tokens: int) -> list[bool]:
        """Patch starts for the first n_tokens tokens; position len(fed) (a sampled token not
        fed yet) takes the patcher's decision for the next position."""
        return (self.patch_starts + [self.next_starts])[:n_tokens]


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    data: bytes  # the generated bytes (prompt not included)
    tokens: list[int]  # the model's ids: the prompt's, then every sampled one (EOS included)
    prompt_tokens: int
    stopped: str  # "eos" or "max_bytes"
    seconds: float  # generation only (after the prompt)


@torch.inference_mode()  # no autograd bookkeeping: most of a tiny model's step is overhead
def generate(decoder, prompt: bytes, max_bytes: int, sampling: Sampling) -> Generation:
    """Prompt, then sample until EOS or max_bytes."""
    if max_bytes < 0:
        raise UserError(f"--max-bytes must be >= 0, got {max_bytes}")
    generator = torch.Generator().manual_seed(sampling.seed)
    logits = decoder.prefill(prompt)
    prompt_tokens = len(decoder.tokens)
    sampled: list[int] = []
    out = bytearray()
    stopped = "max_bytes"
    started = time.perf_counter()
    while len(out) < max_bytes:
        token = choose(logits, sampling, decoder.banned, generator)
        sampled.append(token)
        if token == decoder.eos_id:
            stopped = "eos"
            break
        out += decoder.token_bytes(token)[: max_bytes - len(out)]
        if len(out) >= max_bytes:
            break  # the last token is never fed: nothing reads its logits
        logits = decoder.feed(token)
    seconds = time.perf_counter() - started
    return Generation(bytes(out), decoder.tokens[:prompt_tokens] + sampled, prompt_tokens, stopped, seconds)


# ---------------------------------------------------------------------------------------------
# Loading a model and its companions


def blt_entropy_model(cfg, given: Optional[str]) -> Optional[str]:
    """The entropy-model export a BLT needs (None for modes without entropies).

    The BLT's config records its entropy model (data.entropy_model) and the entropy dataset it
    trained on (data.train, whose dataset.json records the model's weights sha256). A missing
    export is an error; so is one whose weights differ from the recorded ones: patches cut by
    another model's entropies are not the patches this BLT learned on."""
    rule = PatchingRule.from_config(cfg.data.patching)
    if not rule.needs_entropies:
        return None
    recorded = cfg.data.entropy_model
    path = given or recorded
    if not path:
        raise UserError(f"this BLT patches by {rule.mode} and its config records no entropy model "
                        f"(data.entropy_model); give the one it was trained with: --entropy-model EXPORT")
    if not (Path(path) / WEIGHTS).is_file():
        source = "--entropy-model" if given else "the BLT's data.entropy_model"
        raise UserError(f"{path}: entropy model missing ({source}); this BLT patches by {rule.mode} and needs "
                        f"the entropy model it was trained with (--entropy-model EXPORT)")
    if (Path(cfg.data.train) / "dataset.json").is_file():
        check_entropy_source(cfg.data.train, path)  # the weights that made its training entropies
    elif given and recorded and (Path(recorded) / WEIGHTS).is_file():
        want, got = (export_info(p).get("weights_sha256") for p in (recorded, given))
        if want != got:
            raise UserError(f"{given}: a different entropy model (weights {str(got)[:16]}) from the one this BLT "
                            f"was trained with ({recorded}, weights {str(want)[:16]})")
    elif given and given != recorded:
        print(f"blt-dist generate: warning: cannot check that {given} is this BLT's entropy model "
              f"(neither {recorded or 'data.entropy_model'} nor the training entropies are here)", file=sys.stderr)
    return path


def load_decoder(model_dir: str | Path, entropy_model: Optional[str] = None, tokenizer: Optional[str] = None,
                 record: bool = False, entropy_dtype: Optional[str] = None):
    """(decoder, cfg) for an export (or a run dir holding export/). Dispatch by model kind:
    BLT, BPE, and any other CausalLM over the 260 byte ids."""
    model_dir = Path(model_dir)
    if (model_dir / "export").is_dir():
        model_dir = model_dir / "export"
    model, cfg = load_export(model_dir)
    family = cfg.model.family
    if isinstance(model, BLT):
        path = blt_entropy_model(cfg, entropy_model)
        entropy = load_entropy_model(path)[0] if path else None
        dtype, source = entropy_dtype_for(cfg, entropy_dtype)
        if entropy is not None:
            print(f"blt-dist generate: entropies in {dtype} ({source})", file=sys.stderr)
        return BLTDecoder(model, cfg, entropy, record, dtype), cfg
    if family == "bpe":
        path = tokenizer or cfg.data.tokenizer
        if not path:
            raise UserError("this BPE model's config names no tokenizer (data.tokenizer); give --tokenizer")
        return TokenLMDecoder(model, path, record), cfg
    if isinstance(model, CausalLM) and cfg.model.vocab_size == VOCAB_SIZE:
        return ByteLMDecoder(model, record), cfg
    raise UserError(f"{model_dir}: no generation for a {family!r} model")


def printable(data: bytes) -> str:
    """Bytes for a terminal: invalid UTF-8 as \\xNN, control characters other than newline and
    tab escaped too (a generated NUL or ESC must not reach the terminal as such)."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model export dir (RUN/export) or a run dir")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (UTF-8)")
    prompt.add_argument("--prompt-file", type=Path, help="prompt as raw bytes (any bytes: invalid UTF-8, NUL)")
    parser.add_argument("--max-bytes", type=int, default=256, help="stop after this many generated bytes (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set holding this mass")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (torch.Generator)")
    parser.add_argument("--entropy-model", default=None,
                        help="entropy model export for a BLT with entropy patching (default: its data.entropy_model)")
    parser.add_argument("--entropy-dtype", choices=("fp32", "bf16"), default=None,
                        help="dtype of the entropy model (default: the one the BLT's training entropies were computed in)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model for BPE (default: its data.tokenizer)")
    parser.add_argument("--out", type=Path, help="also write the generated bytes, raw, to this file")


def run(args: argparse.Namespace) -> int:
    # scoped, not torch.set_grad_enabled(False): the command also runs inside other processes
    # (tests, notebooks) whose later autograd must keep working
    with torch.inference_mode():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.greedy, args.seed)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UserError(f"{args.prompt_file}: no such prompt file")
        prompt = args.prompt_file.read_bytes()
    else:
        prompt = args.prompt.encode("utf-8", "surrogateescape")  # argv bytes that were not UTF-8 come back as they were
    decoder, cfg = load_decoder(args.model, args.entropy_model, args.tokenizer, entropy_dtype=args.entropy_dtype)

    result = generate(decoder, prompt, args.max_bytes, sampling)
    # Decoded once at the end: a UTF-8 character split across tokens still shows whole.
    sys.stdout.write(printable(result.data) + "\n")
    if args.out is not None:
        args.out.write_bytes(result.data)
    steps = len(result.tokens) - result.prompt_tokens
    rate = len(result.data) / result.seconds if result.seconds > 0 else math.inf
    summary = (f"{cfg.model.family}: {len(result.data)} bytes in {steps} steps, {result.seconds:.2f} s "
               f"({rate:.0f} bytes/s), stopped at {'EOS' if result.stopped == 'eos' else '--max-bytes'}")
    if isinstance(decoder, BLTDecoder):
        starts = decoder.layout_starts(len(result.tokens))
        summary += f"; {sum(starts)} patches, mean {len(starts) / max(sum(starts), 1):.2f} positions per patch"
    print(summary, file=sys.stderr)
    return 0
