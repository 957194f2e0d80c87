"""BLT and LM behaviour beyond causality: shapes, stages, determinism, padding, fully-masked
rows, hash n-grams, overfitting a tiny batch, meta-device construction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blt_dist.config.model import ModelConfig
from blt_dist.model import build_model, patch_layout
from blt_dist.model.hash_embeddings import ngram_hashes
from blt_dist.model.layers import masked_sdpa
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET, PAD_ID
from tests.test_model_causality import random_batch, tiny_blt


def run_stages(model, tokens, lengths, docs):
    patch_states, byte_states, lengths, docs = model.encode(tokens, lengths, docs)
    mask, rope = model.latent_mask_and_rope(lengths, docs)
    for block in model.latent:
        patch_states = block(patch_states, mask, rope)
    return patch_states, byte_states, model.decode(patch_states, byte_states, lengths, docs)


def test_blt_shapes_and_stages_compose_to_forward():
    torch.manual_seed(0)
    cfg = tiny_blt()
    model = build_model(cfg)
    tokens, lengths, docs = random_batch(0, batch=2, capacity=40, num_patches=16)
    patch_states, byte_states, logits = run_stages(model, tokens, lengths, docs)
    assert patch_states.shape == (2, 16, cfg.dim)
    assert byte_states.shape == (2, 40, cfg.encoder.dim)
    assert logits.shape == (2, 40, 260)
    assert torch.equal(logits, model(tokens, lengths, docs))


def test_patch_layout_reads_only_completed_patches():
    # One row: doc 0 = bytes 0..6 as patches [3, 4]; doc 1 = bytes 7..9 as [1, 2]; 2 padding bytes.
    lengths = torch.tensor([[3, 4, 1, 2, 0, 0]])
    docs = torch.tensor([[0] * 7 + [1] * 3 + [-1] * 2])
    layout = patch_layout(lengths, docs)
    assert layout.byte_patch.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 6, 6]]
    assert layout.patch_doc.tolist() == [[0, 0, 1, 1, -1, -1]]
    # Byte 2 closes patch 0; bytes 3..5 still read patch 0; byte 6 closes patch 1; byte 7 (BOS
    # of doc 1) closes patch 2; byte 8 is mid-patch and reads patch 2; byte 9 closes patch 3.
    readable = torch.where(layout.can_read, layout.read_patch, -1)
    assert readable.tolist() == [[-1, -1, 0, 0, 0, 0, 1, 2, 2, 3, -1, -1]]


def test_determinism_under_a_seed():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(tiny_blt())
        tokens, lengths, docs = random_batch(4)
        outputs.append(model(tokens, lengths, docs))
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(124)
    assert not torch.equal(build_model(tiny_blt())(tokens, lengths, docs), outputs[0])


def test_padding_does_not_change_real_logits():
    torch.manual_seed(0)
    model = build_model(tiny_blt()).eval()
    tokens, lengths, docs = random_batch(1, batch=2)
    real = docs >= 0
    with torch.no_grad():
        base = model(tokens, lengths, docs)
        # Garbage in the padding slots: same shapes, so real logits must be bitwise equal.
        garbage = torch.where(real, tokens, torch.randint(OFFSET, 260, tokens.shape))
        assert torch.equal(model(garbage, lengths, docs)[real], base[real])
        # More capacity and more (empty) patch slots: same real logits up to float reassociation.
        wider_tokens = F.pad(tokens, (0, 16), value=PAD_ID)
        wider_docs = F.pad(docs, (0, 16), value=-1)
        wider_lengths = F.pad(lengths, (0, 8), value=0)
        wider = model(wider_tokens, wider_lengths, wider_docs)[:, :40]
    torch.testing.assert_close(wider[real], base[real], rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_finite_with_finite_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_blt())
    capacity, num_patches = 12, 6
    tokens = torch.full((2, capacity), PAD_ID)
    docs = torch.full((2, capacity), -1)
    lengths = torch.zeros(2, num_patches, dtype=torch.long)
    # Row 0: one 5-byte patch (bytes 0..3 have no completed patch), rest padding.
    tokens[0, :5] = torch.tensor([BOS_ID, 70, 71, 72, EOS_ID])
    docs[0, :5] = 0
    lengths[0, 0] = 5
    # Row 1: nothing real at all (every patch empty, every byte padding).
    logits = model(tokens, lengths, docs)
    assert torch.isfinite(logits).all()
    logits[0, :5].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masked_sdpa_gives_zeros_for_rows_without_keys():
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    out = masked_sdpa(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 1], torch.zeros(1, 2, 4))


def test_hash_ngrams_use_only_earlier_bytes_of_the_same_document():
    tokens = torch.randint(OFFSET, 260, (1, 20))
    docs = torch.tensor([[0] * 9 + [1] * 11])
    base = ngram_hashes(tokens, docs, [3, 5])
    changed = tokens.clone()
    changed[0, 6] += 1 if changed[0, 6] < 259 else -1
    after = ngram_hashes(changed, docs, [3, 5])
    for n in (3, 5):
        differs = (after[n] != base[n])[0].nonzero().flatten().tolist()
        # The n-grams ending at 6..6+n-1, cut at the document end (position 8).
        assert differs == list(range(6, min(6 + n, 9)))


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        model = build_model(tiny_blt())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens, lengths, docs = random_batch(2)
    assert torch.isfinite(model(tokens, lengths, docs)).all()


def _overfit(model, forward, targets, weight, steps=40):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = forward()
        loss = (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * weight.flatten()).sum() \
            / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_blt_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(tiny_blt())
    tokens, lengths, docs = random_batch(5, batch=2, capacity=32, num_patches=12)
    targets = tokens.roll(-1, dims=1)
    weight = ((docs >= 0) & (docs.roll(-1, dims=1) == docs)).float()  # real next byte, same document
    weight[:, -1] = 0
    losses = _overfit(model, lambda: model(tokens, lengths, docs), targets, weight)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_lm_shapes_overfit_and_gqa():
    torch.manual_seed(0)
    cfg = ModelConfig(family="bpe", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (2, 24))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 20 + [-1] * 4])
    assert model(tokens).shape == (2, 24, 64)
    targets = tokens.roll(-1, dims=1)
    weight = (docs.roll(-1, dims=1) == docs).float() * (docs >= 0)
    weight[:, -1] = 0
    losses = _overfit(model, lambda: model(tokens, docs), targets, weight)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
