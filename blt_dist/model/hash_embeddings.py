"""Hash n-gram embeddings (BLT paper section 3.2.1).

For each n in `ngram_sizes`, the n-gram *ending* at byte i (bytes i-n+1..i) is hashed into one
of `buckets` rows of its own table; the rows for all n are summed into byte i's embedding.
Only bytes <= i are read, so the embedding is causal. Bytes before the sample start or from an
earlier document are replaced by a filler id: an n-gram never mixes two documents, like
attention.

Hash: a polynomial rolling hash h_n(i) = sum_{k<n} (x_{i-k} + 1) * M^k mod (2^31 - 1), built
up one n at a time. All intermediate values stay below 2^40, so int64 never overflows and the
result is the same on every device.

The meta hash (`model.hash.function=meta`, or `model.layout=meta`) is transformers'
BltForCausalLM / Meta's, bit for bit: h_n(i) = sum_j x_{i-n+1+j} * prime^j over the raw ids in
int64 with wraparound, missing bytes 0, then floor-mod buckets; with several hash functions per
n, one prime each. Its tables are ordered function-major (function f, size index s -> table
f * len(sizes) + s), as HF's fused table. Bytes before the document start are 0 too: for one
document (what HF ever sees) that is HF's padding; packed documents never share an n-gram.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HASH_MULTIPLIER = 1_000_003
HASH_MODULUS = 2**31 - 1
FILLER_ID = 0  # stands for "no byte here" (outside the sample or the document)
# transformers' compute_hash_embeddings (models/blt): hash function f uses META_PRIMES[f % 11].
META_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
               2860486313, 5463458053, 3367900313)


def _as_int64(value: int) -> int:
    """value mod 2^64 as a signed int64: what int64 arithmetic gives for a power that wraps."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shifted(tokens: torch.Tensor, doc_ids: torch.Tensor, k: int) -> torch.Tensor:
    """x_{i-k}, FILLER_ID where there is no such byte in the same document."""
    if k == 0:
        return tokens
    shifted = F.pad(tokens, (k, 0), value=FILLER_ID)[:, : tokens.shape[1]]
    shifted_doc = F.pad(doc_ids, (k, 0), value=-2)[:, : tokens.shape[1]]
    return torch.where(shifted_doc == doc_ids, shifted, FILLER_ID)


def meta_ngram_hashes(tokens: torch.Tensor, doc_ids: torch.Tensor, ngram_sizes: Sequence[int],
                      functions: int, buckets: int) -> list[torch.Tensor]:
    """Bucket ids [B, C] per table (function-major), as HF's byte_group_hash_function % buckets."""
    tokens = tokens.long()
    out = []
    for f in range(functions):
        prime = META_PRIMES[f % len(META_PRIMES)]
        for n in ngram_sizes:
            h = torch.zeros_like(tokens)
            for j in range(n):  # int64 sums and products wrap as in HF: the order does not matter
                h = h + _shifted(tokens, doc_ids, n - 1 - j) * _as_int64(prime ** j)
            out.append(h % buckets)
    return out


def ngram_hashes(tokens: torch.Tensor, doc_ids: torch.Tensor, ngram_sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """tokens, doc_ids: [B, C] -> {n: hash of the n-gram ending at each position, [B, C] int64}."""
    max_n = max(ngram_sizes)
    tokens = tokens.long()
    h = torch.zeros_like(tokens)
    power = 1  # M^k mod modulus, a Python int: exact
    hashes: dict[int, torch.Tensor] = {}
    for k in range(max_n):
        # x_{i-k}: shift right by k; positions with no byte k back, or in another document, get the filler.
        shifted = _shifted(tokens, doc_ids, k)
        h = (h + (shifted + 1) * power) % HASH_MODULUS
        power = power * HASH_MULTIPLIER % HASH_MODULUS
        if k + 1 in ngram_sizes:
            hashes[k + 1] = h
    return hashes


class HashNgramEmbeddings(nn.Module):
    def __init__(self, ngram_sizes: Sequence[int], buckets: int, dim: int, function: str = "project",
                 functions: int = 1):
        super().__init__()
        self.ngram_sizes = list(ngram_sizes)
        self.buckets = buckets
        self.function, self.functions = function, functions
        # One table per (function, n) (ModuleList index f * len(sizes) + i); the reference does the same.
        self.tables = nn.ModuleList(nn.Embedding(buckets, dim) for _ in range(functions * len(self.ngram_sizes)))

    def bucket_ids(self, tokens: torch.Tensor, doc_ids: torch.Tensor) -> list[torch.Tensor]:
        if self.function == "meta":
            return meta_ngram_hashes(tokens, doc_ids, self.ngram_sizes, self.functions, self.buckets)
        hashes = ngram_hashes(tokens, doc_ids, self.ngram_sizes)
        return [hashes[n] % self.buckets for n in self.ngram_sizes]

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ids = self.bucket_ids(tokens, doc_ids)
        out = None
        for bucket_ids, table in zip(ids, self.tables):
            emb = table(bucket_ids)
            out = emb if out is None else out + emb
        return out

    def init_weights(self, std: float) -> None:
        for table in self.tables:
            nn.init.trunc_normal_(table.weight, std=std, a=-3 * std, b=3 * std)
