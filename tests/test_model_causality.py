"""Causality: perturbing byte t leaves every logit at positions < t bitwise unchanged (fp32).

Random patch layouts (length-1 and longer patches, several documents per row, empty trailing
patches, padding), and targeted positions: the last byte of a patch, a document boundary
(BOS), the first byte of a row. This is the test that catches the reference's one-patch lag
on layouts whose first patch is longer than one byte (DESIGN.md).
"""
from __future__ import annotations

import random

import pytest
import torch

from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from blt_dist.model import build_model
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, PAD_ID

CAPACITY, PATCHES = 40, 16


def tiny_blt(**overrides) -> ModelConfig:
    fields = dict(
        family="blt", dim=32, n_layers=2, n_heads=4,
        encoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=6),
        decoder=LocalModelConfig(dim=16, n_layers=2, n_heads=2, window=6),
        cross_attn_k=2, hash=HashEmbeddingConfig(ngram_sizes=[2, 3, 5], buckets=61),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_sample(rng: random.Random, capacity: int, num_patches: int, max_len: int = 5):
    """One row as the loader makes it: documents BOS+bytes+EOS (the row may start and end
    mid-document), a patch starting at every BOS, padding after the real bytes."""
    n_real = rng.randint(capacity // 2, capacity)
    tokens, docs, doc, pos = [], [], 0, 0
    starts_mid_doc = rng.random() < 0.5
    while pos < n_real:
        doc_len = rng.randint(3, 14)
        body = [rng.randint(OFFSET, 259) for _ in range(doc_len)]
        seq = ([] if (pos == 0 and starts_mid_doc) else [BOS_ID]) + body + [EOS_ID]
        for tok in seq[: n_real - pos]:
            tokens.append(tok)
            docs.append(doc)
        pos = len(tokens)
        doc += 1
    # Patches: random lengths 1..max_len, cut at every BOS, at most num_patches of them.
    lengths, current = [], 0
    for i, tok in enumerate(tokens):
        if current and (tok == BOS_ID or current == max_len or rng.random() < 0.35):
            lengths.append(current)
            current = 0
        current += 1
    lengths.append(current)
    while len(lengths) > num_patches:  # too many patches: drop trailing bytes of the row instead
        dropped = lengths.pop()
        del tokens[-dropped:], docs[-dropped:]
    real = len(tokens)
    tokens += [PAD_ID] * (capacity - real)
    docs += [-1] * (capacity - real)
    lengths += [0] * (num_patches - len(lengths))
    return tokens, lengths, docs


def random_batch(seed: int, batch: int = 3, capacity: int = CAPACITY, num_patches: int = PATCHES):
    rng = random.Random(seed)
    rows = [random_sample(rng, capacity, num_patches) for _ in range(batch)]
    tokens, lengths, docs = (torch.tensor([r[i] for r in rows]) for i in range(3))
    return tokens, lengths, docs


def interesting_positions(lengths: torch.Tensor, tokens: torch.Tensor, rng: random.Random) -> list[int]:
    """First byte, last bytes of patches, document starts (BOS), and random positions."""
    ends = (lengths.cumsum(0) - 1)[lengths > 0].tolist()
    real = int(lengths.sum())
    bos = (tokens[:real] == BOS_ID).nonzero().flatten().tolist()
    picks = {0, *rng.sample(ends, min(4, len(ends))), *bos[:3], *rng.sample(range(real), min(4, real))}
    return sorted(picks)


def assert_causal(forward, tokens, doc_ids, positions_per_row, rng):
    base = forward(tokens)
    checked = 0
    for row, positions in enumerate(positions_per_row):
        for t in positions:
            perturbed = tokens.clone()
            old = int(perturbed[row, t])
            perturbed[row, t] = OFFSET + (old - OFFSET + rng.randint(1, 255)) % 256 if old >= OFFSET else OFFSET + 7
            out = forward(perturbed)
            assert torch.equal(out[row, :t], base[row, :t]), f"row {row}: logits before t={t} changed"
            assert not torch.equal(out[row, t:], base[row, t:]), f"row {row}: perturbing t={t} changed nothing"
            # Other rows of the batch never see this row.
            others = [r for r in range(tokens.shape[0]) if r != row]
            assert torch.equal(out[others], base[others])
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blt_is_causal_for_random_layouts(seed):
    torch.manual_seed(seed)
    model = build_model(tiny_blt()).eval()
    tokens, lengths, docs = random_batch(seed)
    rng = random.Random(100 + seed)
    positions = [interesting_positions(lengths[r], tokens[r], rng) for r in range(tokens.shape[0])]
    with torch.no_grad():
        assert_causal(lambda toks: model(toks, lengths, docs), tokens, docs, positions, rng)


@pytest.mark.parametrize("layout", ["bytes", "first_patch_long", "static4", "one_patch_per_doc"])
def test_blt_is_causal_for_special_layouts(layout):
    """Byte patching (all length 1), a long first patch (the reference's failure case),
    static patches, and one long patch per document."""
    torch.manual_seed(0)
    model = build_model(tiny_blt()).eval()
    capacity, num_patches = 24, 24
    tokens = torch.randint(OFFSET, 260, (1, capacity))
    docs = torch.zeros(1, capacity, dtype=torch.long)
    tokens[0, 0] = BOS_ID
    if layout == "bytes":
        lengths = [1] * 24
    elif layout == "first_patch_long":
        lengths = [6, 1, 3, 4, 10]
    elif layout == "static4":
        lengths = [4] * 6
    else:
        tokens[0, 11], tokens[0, 12] = EOS_ID, BOS_ID
        docs[0, 12:] = 1
        lengths = [12, 12]
    lengths = torch.tensor([lengths + [0] * (num_patches - len(lengths))])
    rng = random.Random(7)
    with torch.no_grad():
        assert_causal(lambda toks: model(toks, lengths, docs), tokens, docs, [list(range(capacity))], rng)


@pytest.mark.parametrize("family,window", [("entropy", 5), ("bpe", None)])
def test_lm_is_causal_across_documents(family, window):
    torch.manual_seed(0)
    vocab = 260 if family == "entropy" else 300
    model = build_model(ModelConfig(family=family, vocab_size=vocab, dim=32, n_layers=2, n_heads=4,
                                    window=window)).eval()
    tokens, _, docs = random_batch(3, batch=2)
    rng = random.Random(5)
    positions = [sorted({0, *rng.sample(range(30), 8), *(tokens[r] == BOS_ID).nonzero().flatten().tolist()})
                 for r in range(2)]
    with torch.no_grad():
        assert_causal(lambda toks: model(toks, docs), tokens, docs, positions, rng)


def test_lm_never_attends_across_documents_or_beyond_window():
    """Position i's logits depend only on bytes of its own document within the window."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="entropy", dim=32, n_layers=1, n_heads=4, window=4)).eval()
    tokens = torch.randint(OFFSET, 260, (1, 16))
    docs = torch.tensor([[0] * 6 + [1] * 10])
    with torch.no_grad():
        base = model(tokens, docs)
        changed = tokens.clone()
        changed[0, 5] = OFFSET + (int(tokens[0, 5]) - OFFSET + 1) % 256  # last byte of document 0
        out = model(changed, docs)
    assert torch.equal(out[0, 6:], base[0, 6:])  # document 1 never saw it
    with torch.no_grad():
        changed = tokens.clone()
        changed[0, 6] = OFFSET + (int(tokens[0, 6]) - OFFSET + 1) % 256
        out = model(changed, docs)
    # One layer, window 4: position 6 is visible from 6..9 only.
    assert not torch.equal(out[0, 9], base[0, 9])
    assert torch.equal(out[0, 10:], base[0, 10:])
