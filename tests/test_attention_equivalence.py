"""Fast attention paths == the dense masked-SDPA reference, forward and backward, in fp32.

Kernels alone (self-attention blocks / is_causal / dense fallback, the decoder's patch read, the
encoder's pooling) on random layouts: several documents per row, padding, windows smaller
and larger than the row, rows that are not a whole number of blocks, empty patches. Then the
whole BLT and CausalLM under attention=dense vs attention=blocked on the same weights: same
logits, same gradients of every parameter. GPU paths (flex, flash) are `gpu`-marked and run
only where CUDA exists; their CPU twin is the blocked path tested here.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from blt_dist.config import load_config
from blt_dist.config.model import ModelConfig
from blt_dist.errors import ConfigError
from blt_dist.model import attention as attn
from blt_dist.model import build_model, patch_layout
from tests.conftest import REPO
from tests.test_model_causality import random_batch, tiny_blt

ATOL = RTOL = 1e-5
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def random_doc_ids(seed: int, batch: int, length: int, max_docs: int, padding: bool = True) -> torch.Tensor:
    """Rows of contiguous documents (random lengths) and sometimes trailing padding (-1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        real = rng.randint(length // 2, length) if padding else length
        cuts = sorted(rng.sample(range(1, real), min(rng.randint(0, max_docs - 1), real - 1)))
        row = []
        for doc, (start, end) in enumerate(zip([0, *cuts], [*cuts, real])):
            row += [doc] * (end - start)
        rows.append(row + [-1] * (length - real))
    return torch.tensor(rows)


def qkv(batch: int, heads: int, q_len: int, k_len: int, head_dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, generator=gen, requires_grad=True)  # noqa: E731
    return make(q_len), make(k_len), make(k_len)


def outputs_and_grads(kernel, q, k, v, upstream: torch.Tensor):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = kernel(q, k, v)
    (out * upstream).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def assert_same(fast, dense, q, k, v):
    upstream = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    for name, a, b in zip(("out", "dq", "dk", "dv"), outputs_and_grads(fast, q, k, v, upstream),
                          outputs_and_grads(dense, q, k, v, upstream)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Self-attention kernels


@pytest.mark.parametrize("length,window,max_docs,padding,expected", [
    (50, 8, 4, True, attn.BlockedSelfAttention),  # window << T, T not a multiple of the block
    (50, 8, 1, False, attn.BlockedSelfAttention),  # one document: blocks without document ids
    (77, 20, 3, True, attn.BlockedSelfAttention),  # window and documents both limit the keys
    (150, 200, 12, True, attn.BlockedSelfAttention),  # window > T: only documents limit them
    (201, None, 16, True, attn.BlockedSelfAttention),  # no window, several documents
    (90, None, 2, True, attn.BlockedSelfAttention),  # one document almost as long as the row
    (40, None, 1, False, attn.CausalSelfAttention),  # one document per row: is_causal, no mask
    (40, 64, 1, False, attn.CausalSelfAttention),  # window >= T changes nothing
])
def test_blocked_self_attention_matches_dense(length, window, max_docs, padding, expected):
    for seed in range(3):
        doc_ids = random_doc_ids(seed, 3, length, max_docs, padding)
        fast = attn.self_attention("blocked", length, doc_ids, window, "cpu")
        assert type(fast) is expected, (seed, type(fast))
        if expected is attn.BlockedSelfAttention:
            assert len(fast.masks) > 1  # several query blocks, the last one partial
        dense = attn.self_attention("dense", length, doc_ids, window, "cpu")
        assert_same(fast, dense, *qkv(3, 2, length, length, seed=seed))


def test_blocks_without_doc_ids_broadcast_over_the_batch():
    fast = attn.self_attention("auto", 70, None, 12, "cpu")
    assert isinstance(fast, attn.BlockedSelfAttention)
    assert_same(fast, attn.self_attention("dense", 70, None, 12, "cpu"), *qkv(2, 3, 70, 70))


def test_blocked_work_and_memory_follow_the_layout():
    length, window, batch = 4096, 64, 2
    blocked = attn.self_attention("blocked", length, random_doc_ids(0, batch, length, 50), window, "cpu")
    masked = sum(mask.numel() for mask in blocked.masks)  # every (query, key) score it computes
    assert masked <= batch * length * (window + 2 * blocked.block)  # dense: batch * 4096^2
    # No window, documents of 256: a query block never reaches back past its document's start.
    docs = torch.arange(length).div(256, rounding_mode="floor")[None]
    blocked = attn.self_attention("blocked", length, docs, None, "cpu")
    assert all(first * blocked.block >= (i * blocked.block) // 256 * 256 for i, first in enumerate(blocked.first_block))
    assert sum(mask.numel() for mask in blocked.masks) <= length * (256 + blocked.block)


def test_split_document_runs_dense():
    """An id that comes back after another id is one document to the dense mask: only dense is exact."""
    doc_ids = torch.tensor([[0] * 5 + [1] * 5 + [0] * 5 + [2] * 15])
    fast = attn.self_attention("blocked", 30, doc_ids, 6, "cpu")
    assert isinstance(fast, attn.DenseSelfAttention)


# ---------------------------------------------------------------------------------------------
# Cross-attention kernels (decoder read, encoder pooling)


@pytest.mark.parametrize("seed", range(4))
def test_patch_read_matches_dense(seed):
    k = 2 + seed % 2
    tokens, lengths, docs = random_batch(seed, batch=3, capacity=40, num_patches=16)
    layout = patch_layout(lengths, docs)
    fast = attn.patch_read_attention("blocked", layout.read_patch, layout.can_read, 16, k)
    dense = attn.patch_read_attention("dense", layout.read_patch, layout.can_read, 16, k)
    q, kk, v = qkv(3, 2, 40, 16 * k, seed=seed)
    assert_same(fast, dense, q, kk, v)
    # Bytes with nothing to read: exact zeros and no gradient.
    out, dq, _, _ = outputs_and_grads(fast, q, kk, v, torch.ones(3, 2, 40, 8))
    unread = ~layout.can_read
    assert unread.any()
    assert torch.equal(out.transpose(1, 2)[unread], torch.zeros_like(out.transpose(1, 2)[unread]))
    assert torch.equal(dq.transpose(1, 2)[unread], torch.zeros_like(dq.transpose(1, 2)[unread]))


@pytest.mark.parametrize("seed", range(4))
def test_patch_pool_matches_dense(seed):
    k = 2 + seed % 2
    tokens, lengths, docs = random_batch(seed, batch=3, capacity=40, num_patches=16)
    layout = patch_layout(lengths, docs)
    assert (lengths == 0).any()  # empty patches are part of the test
    fast = attn.patch_pool_attention("blocked", layout.byte_patch, layout.patch_starts, layout.patch_lengths, k)
    dense = attn.patch_pool_attention("dense", layout.byte_patch, layout.patch_starts, layout.patch_lengths, k)
    q, kk, v = qkv(3, 2, 16 * k, 40, seed=seed)
    assert_same(fast, dense, q, kk, v)
    out, dq, _, _ = outputs_and_grads(fast, q, kk, v, torch.ones(3, 2, 16 * k, 8))
    empty_slots = (lengths == 0).repeat_interleave(k, dim=1)  # [B, P * k]
    assert torch.equal(out.transpose(1, 2)[empty_slots], torch.zeros_like(out.transpose(1, 2)[empty_slots]))
    assert torch.equal(dq.transpose(1, 2)[empty_slots], torch.zeros_like(dq.transpose(1, 2)[empty_slots]))


def test_pooling_of_a_batch_without_bytes():
    lengths = torch.zeros(2, 4, dtype=torch.long)
    docs = torch.full((2, 8), -1)
    layout = patch_layout(lengths, docs)
    fast = attn.patch_pool_attention("blocked", layout.byte_patch, layout.patch_starts, layout.patch_lengths, 2)
    out = fast(*qkv(2, 2, 8, 8))
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# Whole models on the same weights


def logits_and_grads(model, *inputs):
    model.zero_grad()
    logits = model(*inputs)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * upstream).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_models_agree(cfg: ModelConfig, *inputs, fast: str = "blocked", tol: float = ATOL, device="cpu",
                        dtype=torch.float32):
    """Logits elementwise within `tol`; each parameter's gradient within `tol` times its largest
    entry. (A parameter's gradient sums thousands of terms, e.g. an embedding row over every
    byte, in a different order on each path: fp32 rounding is relative to that scale, and a
    small entry can differ by more than 1e-5 of itself. In fp64 both criteria hold at 1e-10.)"""
    torch.manual_seed(0)
    dense = build_model(dataclasses.replace(cfg, attention="dense")).to(device, dtype)
    other = build_model(dataclasses.replace(cfg, attention=fast)).to(device, dtype)
    other.load_state_dict(dense.state_dict())
    inputs = [x.to(device) for x in inputs]
    want, want_grads = logits_and_grads(dense, *inputs)
    got, got_grads = logits_and_grads(other, *inputs)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name, ref in want_grads.items():
        error = (got_grads[name] - ref).abs().max().item()
        assert error <= tol * max(ref.abs().max().item(), 1.0 if dtype == torch.float64 else 1e-3), (name, error)


@pytest.mark.parametrize("seed,enc_window,dec_window", [(0, 6, 6), (1, 6, 64), (2, 13, 5)])
def test_blt_blocked_equals_dense(seed, enc_window, dec_window):
    base = tiny_blt()
    cfg = dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, window=enc_window),
                              decoder=dataclasses.replace(base.decoder, window=dec_window))
    tokens, lengths, docs = random_batch(seed, batch=3, capacity=40, num_patches=16)
    assert_models_agree(cfg, tokens, lengths, docs)


def test_blt_blocked_equals_dense_in_float64():
    """In fp64 the paths agree to rounding: they compute the same function, not an approximation."""
    tokens, lengths, docs = random_batch(5, batch=3, capacity=40, num_patches=16)
    assert_models_agree(tiny_blt(), tokens, lengths, docs, tol=1e-10, dtype=torch.float64)


def test_blt_one_document_per_row_uses_causal_latent():
    """Trailing empty patches join the row's last document in the latent: plain causal attention."""
    tokens, lengths, docs = random_batch(4, batch=2, capacity=40, num_patches=16)
    docs = torch.where(docs >= 0, 0, -1)  # one document (+ padding) per row
    cfg = tiny_blt()
    kernel, _ = build_model(cfg).latent_mask_and_rope(lengths, docs)
    assert isinstance(kernel, attn.CausalSelfAttention)
    assert_models_agree(cfg, tokens, lengths, docs)


@pytest.mark.parametrize("family,window,kv_heads,layout", [
    ("entropy", 5, None, "docs"), ("entropy", 16, None, "none"), ("entropy", 64, None, "docs"),
    ("bpe", None, 2, "docs"), ("bpe", None, 2, "one"), ("bpe", None, None, "none"),
])
def test_lm_blocked_equals_dense(family, window, kv_heads, layout):
    vocab = 260 if family == "entropy" else 300
    cfg = ModelConfig(family=family, vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                      window=window)
    length = 45
    tokens = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(3))
    if layout == "none":
        assert_models_agree(cfg, tokens)
    else:
        docs = random_doc_ids(5, 3, length, 6 if layout == "docs" else 1, padding=layout == "docs")
        assert_models_agree(cfg, tokens, docs)


# ---------------------------------------------------------------------------------------------
# The knob


def test_attention_knob_is_validated_with_its_key_path():
    problems = ModelConfig(attention="fast").validate("model")
    assert problems and problems[0][0] == "model.attention"
    with pytest.raises(ConfigError, match="model.attention: one of auto, dense, blocked, flex, flash"):
        load_config(REPO / "configs/blt/tiny.yaml", ["model.attention=fast"])
    assert load_config(REPO / "configs/blt/tiny.yaml", ["model.attention=dense"]).model.attention == "dense"
    for mode in ("auto", "dense", "blocked", "flex", "flash"):
        assert ModelConfig(attention=mode).validate("model") == []


def test_auto_is_the_fastest_exact_path_for_the_device():
    # flash on CUDA falls back to the blocked kernel wherever it is not exact (fp32, no varlen)
    assert attn.resolve_mode("auto", torch.device("cuda", 0)) == "flash"
    assert attn.resolve_mode("auto", torch.device("cpu")) == "blocked"
    assert attn.resolve_mode("auto", "cpu") == "blocked"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
@pytest.mark.parametrize("mode", ["flex", "flash"])
def test_gpu_modes_are_refused_on_cpu(mode):
    model = build_model(dataclasses.replace(tiny_blt(), attention=mode))
    with pytest.raises(ConfigError, match="model.attention.*CUDA"):
        model(*random_batch(0))


def test_flex_rule_is_the_dense_mask():
    """The flex block mask's rule, evaluated on CPU (no kernel), is exactly the dense mask."""
    from torch.nn.attention.flex_attention import create_mask

    length, window = 45, 7
    doc_ids = random_doc_ids(1, 2, length, 4)
    rule = attn.FlexSelfAttention.rule(doc_ids, window)
    assert torch.equal(create_mask(rule, 2, 1, length, length, device="cpu"),
                       attn.self_attention_mask(length, doc_ids, window, "cpu").expand(2, 1, -1, -1))


def test_flash_sequences_and_fp32_fallback():
    """Flash's sequences are the documents of every row (cut at row ends); in fp32 (no flash
    kernel) it runs the blocked path, which equals dense."""
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [4, 4, 4, 4, 4, 4]])
    flash = attn.FlashSelfAttention(6, doc_ids, None, "cpu")
    cu_seqlens, longest = flash.sequences(2)
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 12] and longest == 6
    doc_ids = random_doc_ids(2, 2, 60, 5)
    assert_same(attn.FlashSelfAttention(60, doc_ids, 9, "cpu"), attn.self_attention("dense", 60, doc_ids, 9, "cpu"),
                *qkv(2, 2, 60, 60))


# ---------------------------------------------------------------------------------------------
# GPU paths (run where CUDA exists)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["flex", "flash", "blocked"])
@pytest.mark.parametrize("length,window,max_docs", [(300, 64, 5), (256, None, 4), (200, None, 1)])
def test_gpu_self_attention_matches_dense(mode, length, window, max_docs):
    doc_ids = random_doc_ids(0, 2, length, max_docs, padding=max_docs > 1).cuda()
    fast = attn.self_attention(mode, length, doc_ids, window, "cuda")
    dense = attn.self_attention("dense", length, doc_ids, window, "cuda")
    q, k, v = (x.detach().cuda() for x in qkv(2, 4, length, length, head_dim=64))
    # Flash kernels run in bf16 only: compare flash in bf16 against dense in fp32, relative to
    # each tensor's scale (bf16 keeps 8 bits).
    dtype, tol = (torch.bfloat16, 2e-2) if mode == "flash" else (torch.float32, 1e-4)
    upstream = torch.randn(q.shape, device="cuda")
    got = outputs_and_grads(fast, q.to(dtype), k.to(dtype), v.to(dtype), upstream.to(dtype))
    want = outputs_and_grads(dense, q, k, v, upstream)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a.float() - b).abs().max() <= tol * b.abs().max(), name


def gpu_blt() -> ModelConfig:
    """tiny_blt with head dims of 16 (flex_attention's smallest)."""
    base = tiny_blt(dim=64)
    return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, dim=32),
                               decoder=dataclasses.replace(base.decoder, dim=32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["flex", "flash", "blocked"])
def test_gpu_blt_equals_dense(mode):
    """fp32 on the GPU: flash falls back to the blocked path there, flex runs its kernels."""
    tokens, lengths, docs = random_batch(0, batch=3, capacity=40, num_patches=16)
    assert_models_agree(gpu_blt(), tokens, lengths, docs, fast=mode, tol=1e-4, device="cuda")


# ---------------------------------------------------------------------------------------------
# Layout facts: the loader's host-side reading of doc_ids gives the forward it would have read


@pytest.mark.parametrize("max_docs,padding", [(1, False), (1, True), (5, True), (4, False)])
def test_sequence_facts_are_what_the_kernels_would_read(max_docs, padding):
    doc_ids = random_doc_ids(7, 3, 50, max_docs, padding=padding)
    facts = attn.SequenceFacts.of(doc_ids)
    assert facts.one_document == bool((doc_ids == doc_ids[:, :1]).all()) == (max_docs == 1 and not padding)
    assert facts.runs and facts.first_key.shape == (50,)
    flash = attn.FlashSelfAttention(50, doc_ids, None, "cpu")
    cu_seqlens, longest = flash.sequences(3)
    assert torch.equal(facts.cu_seqlens, cu_seqlens) and facts.longest == longest
    for window in (None, 7):
        with_facts = attn.self_attention("blocked", 50, doc_ids, window, "cpu", facts)
        without = attn.self_attention("blocked", 50, doc_ids, window, "cpu")
        assert type(with_facts) is type(without)
        if isinstance(without, attn.BlockedSelfAttention):
            assert with_facts.first_block == without.first_block
        assert_same(with_facts, without, *qkv(3, 2, 50, 50))


def test_models_given_the_loaders_facts_compute_the_same_logits():
    from blt_dist.model import batch_facts

    tokens, lengths, docs = random_batch(3, batch=3, capacity=40, num_patches=16)
    torch.manual_seed(0)
    blt = build_model(tiny_blt())
    facts = batch_facts({"patch_lengths": lengths, "doc_ids": docs}, "blt")
    assert facts.longest_patch == int(lengths.max()) and facts.patches is not None
    assert torch.equal(blt(tokens, lengths, docs, facts), blt(tokens, lengths, docs))
    lm = build_model(ModelConfig(family="entropy", vocab_size=260, dim=32, n_layers=2, n_heads=4, window=9))
    docs = random_doc_ids(4, 3, 45, 5)
    ids = torch.randint(0, 260, (3, 45), generator=torch.Generator().manual_seed(3))
    assert torch.equal(lm(ids, docs, batch_facts({"doc_ids": docs}, "entropy")), lm(ids, docs))


@pytest.mark.gpu
@needs_cuda
def test_gpu_flash_blt_with_the_loaders_facts_equals_without():
    """bf16 flash: the host-planned sequences give the kernels the tensors would have."""
    from blt_dist.model import batch_facts

    tokens, lengths, docs = random_batch(0, batch=3, capacity=40, num_patches=16)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(gpu_blt(), attention="flash")).cuda().bfloat16()
    facts = batch_facts({"patch_lengths": lengths, "doc_ids": docs}, "blt")
    inputs = [x.cuda() for x in (tokens, lengths, docs)]
    assert torch.equal(model(*inputs, facts), model(*inputs))
