"""Hash n-gram embeddings (BLT paper section 3.2.1).

For each n in `ngram_sizes`, the n-gram *ending* at byte i (bytes i-n+1..i) is hashed into one
of `buckets` rows of its own table; the rows for all n are summed into byte i's embedding.
Only bytes <= i are read, so the embedding is causal. Bytes before the sample start or from an
earlier document are replaced by a filler id: an n-gram never mixes two documents, like
attention.

Hash: a polynomial rolling hash h_n(i) = sum_{k<n} (x_{i-k} + 1) * M^k mod (2^31 - 1), built
up one n at a time. All intermediate values stay below 2^40, so int64 never overflows and the
result is the same on every device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HASH_MULTIPLIER = 1_000_003
HASH_MODULUS = 2**31 - 1
FILLER_ID = 0  # stands for "no byte here" (outside the sample or the document)


def ngram_hashes(tokens: torch.Tensor, doc_ids: torch.Tensor, ngram_sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """tokens, doc_ids: [B, C] -> {n: hash of the n-gram ending at each position, [B, C] int64}."""
    max_n = max(ngram_sizes)
    tokens = tokens.long()
    h = torch.zeros_like(tokens)
    power = 1  # M^k mod modulus, a Python int: exact
    hashes: dict[int, torch.Tensor] = {}
    for k in range(max_n):
        # x_{i-k}: shift right by k; positions with no byte k back, or in another document, get the filler.
        if k == 0:
            shifted = tokens
        else:
            shifted = F.pad(tokens, (k, 0), value=FILLER_ID)[:, : tokens.shape[1]]
            shifted_doc = F.pad(doc_ids, (k, 0), value=-2)[:, : tokens.shape[1]]
            shifted = torch.where(shifted_doc == doc_ids, shifted, FILLER_ID)
        h = (h + (shifted + 1) * power) % HASH_MODULUS
        power = power * HASH_MULTIPLIER % HASH_MODULUS
        if k + 1 in ngram_sizes:
            hashes[k + 1] = h
    return hashes


class HashNgramEmbeddings(nn.Module):
    def __init__(self, ngram_sizes: Sequence[int], buckets: int, dim: int):
        super().__init__()
        self.ngram_sizes = list(ngram_sizes)
        self.buckets = buckets
        # One table per n (ModuleList index i <-> ngram_sizes[i]); the reference does the same.
        self.tables = nn.ModuleList(nn.Embedding(buckets, dim) for _ in self.ngram_sizes)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hashes = ngram_hashes(tokens, doc_ids, self.ngram_sizes)
        out = None
        for n, table in zip(self.ngram_sizes, self.tables):
            emb = table(hashes[n] % self.buckets)
            out = emb if out is None else out + emb
        return out

    def init_weights(self, std: float) -> None:
        for table in self.tables:
            nn.init.trunc_normal_(table.weight, std=std, a=-3 * std, b=3 * std)
