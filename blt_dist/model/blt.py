"""Byte Latent Transformer: local encoder -> latent (global) transformer over patches -> local decoder.

Shapes are static per config: a sample holds C bytes (the byte capacity) cut into P patches.
Patch boundaries come in as data (`patch_lengths`, from the loader's entropy patching);
the model never computes entropies.

    tokens [B, C], patch_lengths [B, P], doc_ids [B, C]
      encoder:  byte embedding + hash n-gram embeddings -> windowed causal self-attention
                -> per patch, k queries (initialised from the max-pool of the patch's bytes)
                cross-attend to that patch's bytes -> concat k -> linear -> patch_states [B, P, D]
      latent:   transformer blocks over patches, causal, never across documents
      decoder:  byte states start from the encoder's; before each decoder layer, bytes
                cross-attend to the k projected vectors of ONE patch (see below) -> head [B, C, 260]

Causal patch rule. Byte i may read latent output only of a patch that has ENDED at or before
i: it reads the latest such patch in its own document (the patch it closes, if i is a patch's
last byte; otherwise the previous patch). The latent state of patch j depends on bytes up to
the end of patch j, so no byte sees a later byte, for every patch layout. (The reference's
"one-patch lag" is causal only when the first patch is a single byte: see DESIGN.md.) A byte
with no completed patch in its document before it reads nothing: its cross-attention row is
empty and contributes exact zeros. Reading only the latest patch (not all earlier ones) keeps
the decoder's cross-attention local, as in the reference; older patches reach byte i through
the latent transformer.

Attention (`cfg.attention`, model/attention.py): every module builds its kernels once per
forward from the layout: windowed self-attention over bytes (blocks, O(C*W)), the pooling
(each patch's queries gather its own bytes), the decoder's read (each byte gathers the k
vectors of its patch), and document-causal attention over patches. `dense` builds the
[B, 1, Tq, Tk] masks instead: the reference the others are tested against.

Pipeline stages: `encode` -> each of `latent` (with `latent_mask_and_rope`) -> `decode`; the
integer layout tensors (patch_lengths, doc_ids) travel alongside and every stage rebuilds its
attention from them. `forward` is exactly that composition.

Incremental decoding (generation): `step(token, closes_patch, cache)` takes one byte of one
document and whether it is the last byte of its patch (decided by the caller's patcher, which
may read only bytes up to this one) and returns the logits `forward` gives at that byte, for
the same layout. Per byte: the encoder's windowed self-attention from a KV cache (the hash
n-grams need the last max(n) bytes); when the byte closes a patch, that patch is pooled from
its bytes' encoder states and the latent transformer takes one cached step over it; then the
decoder (KV cache, its window) reads the latest completed patch: the causal patch rule above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from blt_dist.config.model import ModelConfig
from blt_dist.model.attention import (
    BatchFacts,
    SequenceFacts,
    every_key_attention,
    patch_pool_attention,
    patch_read_attention,
    resolve_mode,
    self_attention,
)
from blt_dist.model.hash_embeddings import HashNgramEmbeddings
from blt_dist.model.layers import (
    CrossAttentionBlock,
    RMSNorm,
    StackCache,
    TransformerBlock,
    cached_rope,
    init_linear,
    residual_std,
    rotary_cos_sin,
)
from blt_dist.vocab import VOCAB_SIZE


@dataclass
class PatchLayout:
    """Integer views of one batch's patching, derived from patch_lengths and doc_ids."""

    byte_patch: torch.Tensor  # [B, C] patch index of each byte; P for padding bytes
    patch_starts: torch.Tensor  # [B, P] position of each patch's first byte
    patch_lengths: torch.Tensor  # [B, P] bytes in each patch; 0 for empty patches
    patch_doc: torch.Tensor  # [B, P] document of each patch; -1 for empty patches
    read_patch: torch.Tensor  # [B, C] the completed patch byte i reads in the decoder
    can_read: torch.Tensor  # [B, C] False: no completed patch in the byte's document yet

    @property
    def num_patches(self) -> int:
        return self.patch_doc.shape[1]


def patch_layout(patch_lengths: torch.Tensor, doc_ids: torch.Tensor) -> PatchLayout:
    """Vectorised (no per-byte Python loop). Assumes real bytes first, empty patches last."""
    batch, capacity = doc_ids.shape
    num_patches = patch_lengths.shape[1]
    ends = patch_lengths.long().cumsum(-1)  # exclusive end of each patch
    starts = ends - patch_lengths
    positions = torch.arange(capacity, device=doc_ids.device).expand(batch, capacity).contiguous()
    # The patch holding byte i is the first whose end exceeds i; padding bytes get P.
    byte_patch = torch.searchsorted(ends.contiguous(), positions, right=True)
    nonempty = patch_lengths > 0
    patch_doc = torch.where(nonempty, doc_ids.gather(1, starts.clamp(max=capacity - 1)), -1)

    sentinel = torch.full((batch, 1), capacity + 1, dtype=ends.dtype, device=ends.device)
    last_byte_of_patch = torch.cat([ends, sentinel], dim=1).gather(1, byte_patch) - 1
    closes_patch = positions == last_byte_of_patch
    read_patch = byte_patch - (~closes_patch).long()
    read_doc = patch_doc.gather(1, read_patch.clamp(0, num_patches - 1))
    can_read = (read_patch >= 0) & (byte_patch < num_patches) & (read_doc == doc_ids)
    return PatchLayout(byte_patch, starts, patch_lengths.long(), patch_doc, read_patch, can_read)


class LocalEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        enc, k = cfg.encoder, cfg.cross_attn_k
        self.cfg = cfg
        self.byte_embedding = nn.Embedding(VOCAB_SIZE, enc.dim)
        self.hash_embeddings = HashNgramEmbeddings(cfg.hash.ngram_sizes, cfg.hash.buckets, enc.dim,
                                                   cfg.hash_function, cfg.hash.functions)
        self.layers = nn.ModuleList(
            TransformerBlock(enc.dim, enc.n_heads, cfg.ffn_hidden(enc.dim), eps=cfg.norm_eps)
            for _ in range(enc.n_layers)
        )
        # Patch pooling: k queries per patch from the max-pool of its bytes, one cross-attention
        # over the patch's bytes, then the k outputs concatenated and projected to the latent width.
        self.pool_query = nn.Linear(enc.dim, k * enc.dim, bias=False)
        self.pool_attention = CrossAttentionBlock(enc.dim, enc.n_heads, cfg.norm_eps, cfg.uses_double_residual)
        # The meta layout has no projection when the k outputs already make the latent width.
        self.patch_proj = nn.Linear(k * enc.dim, cfg.dim, bias=False) if cfg.uses_encoder_projection else nn.Identity()

    def init_weights(self) -> None:
        std, n = self.cfg.init_std, self.cfg.encoder.n_layers
        nn.init.trunc_normal_(self.byte_embedding.weight, std=std, a=-3 * std, b=3 * std)
        self.hash_embeddings.init_weights(std)
        for block in self.layers:
            block.init_weights(std, residual_std(std, n))
        init_linear(self.pool_query, std)
        self.pool_attention.init_weights(std, std)
        if isinstance(self.patch_proj, nn.Linear):
            init_linear(self.patch_proj, std)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor, layout: PatchLayout,
                facts: Optional[BatchFacts] = None):
        enc, k = self.cfg.encoder, self.cfg.cross_attn_k
        batch, capacity = tokens.shape
        h = self.byte_embedding(tokens) + self.hash_embeddings(tokens, doc_ids)
        attention = self_attention(self.cfg.attention, capacity, doc_ids, enc.window, tokens.device,
                                   facts.positions if facts else None)
        rope = rotary_cos_sin(capacity, enc.dim // enc.n_heads, self.cfg.rope_theta, tokens.device)
        for block in self.layers:
            h = block(h, attention, rope)

        # Max-pool each patch's byte states (padding goes to a dropped extra slot; empty patches stay 0).
        num_patches = layout.num_patches
        index = layout.byte_patch.unsqueeze(-1).expand(-1, -1, enc.dim)
        pooled = h.new_zeros(batch, num_patches + 1, enc.dim)
        pooled = pooled.scatter_reduce(1, index, h, reduce="amax", include_self=False)[:, :num_patches]
        queries = self.pool_query(pooled).reshape(batch, num_patches * k, enc.dim)
        # Query slot s belongs to patch s // k and sees exactly that patch's bytes.
        pooling = patch_pool_attention(self.cfg.attention, layout.byte_patch, layout.patch_starts,
                                       layout.patch_lengths, k, facts.longest_patch if facts else None)
        queries = self.pool_attention(queries, h, pooling)
        patch_states = self.patch_proj(queries.reshape(batch, num_patches, k * enc.dim))
        return patch_states, h

    def forward_byte(self, recent_tokens: torch.Tensor, cache: StackCache) -> torch.Tensor:
        """The next byte's state [1, 1, d] (`forward`'s h at that position). recent_tokens
        [1, <= max(n)]: the byte and those before it in its document (its hash n-grams)."""
        enc = self.cfg.encoder
        hashed = self.hash_embeddings(recent_tokens, torch.zeros_like(recent_tokens))[:, -1:]
        h = self.byte_embedding(recent_tokens[:, -1:]) + hashed
        rope = cached_rope(cache, 1, enc.dim // enc.n_heads, self.cfg.rope_theta, recent_tokens.device)
        for block, layer_cache in zip(self.layers, cache.layers):
            h = block.forward_cached(h, rope, layer_cache)
        cache.position += 1
        return h

    def pool_patch(self, byte_states: torch.Tensor) -> torch.Tensor:
        """One completed patch's bytes [1, L, d] -> its patch state [1, 1, D] (`forward`'s pooling)."""
        k, dim = self.cfg.cross_attn_k, self.cfg.encoder.dim
        queries = self.pool_query(byte_states.amax(dim=1, keepdim=True)).reshape(1, k, dim)
        queries = self.pool_attention(queries, byte_states, every_key_attention)
        return self.patch_proj(queries.reshape(1, 1, k * dim))


class LocalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dec, k = cfg.decoder, cfg.cross_attn_k
        self.cfg = cfg
        self.latent_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.uses_latent_norm else nn.Identity()  # meta: none
        self.patch_proj = nn.Linear(cfg.dim, k * dec.dim, bias=False)  # patch -> k byte-width vectors
        self.cross_attentions = nn.ModuleList(
            CrossAttentionBlock(dec.dim, dec.n_heads, cfg.norm_eps, cfg.uses_double_residual)
            for _ in range(dec.n_layers)
        )
        self.layers = nn.ModuleList(
            TransformerBlock(dec.dim, dec.n_heads, cfg.ffn_hidden(dec.dim), eps=cfg.norm_eps)
            for _ in range(dec.n_layers)
        )
        self.norm = RMSNorm(dec.dim, cfg.norm_eps)
        self.output = nn.Linear(dec.dim, VOCAB_SIZE, bias=False)

    def init_weights(self) -> None:
        std, n = self.cfg.init_std, self.cfg.decoder.n_layers
        if isinstance(self.latent_norm, RMSNorm):
            self.latent_norm.reset_parameters()
        init_linear(self.patch_proj, std)
        for cross, block in zip(self.cross_attentions, self.layers):
            cross.init_weights(std, residual_std(std, n))
            block.init_weights(std, residual_std(std, n))
        self.norm.reset_parameters()
        init_linear(self.output, self.cfg.decoder.dim ** -0.5)

    def forward(self, patch_states: torch.Tensor, byte_states: torch.Tensor, doc_ids: torch.Tensor,
                layout: PatchLayout, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        dec, k = self.cfg.decoder, self.cfg.cross_attn_k
        batch, capacity, _ = byte_states.shape
        num_patches = layout.num_patches
        memory = self.patch_proj(self.latent_norm(patch_states)).reshape(batch, num_patches * k, dec.dim)
        reading = patch_read_attention(self.cfg.attention, layout.read_patch, layout.can_read, num_patches, k)
        attention = self_attention(self.cfg.attention, capacity, doc_ids, dec.window, doc_ids.device,
                                   facts.positions if facts else None)
        rope = rotary_cos_sin(capacity, dec.dim // dec.n_heads, self.cfg.rope_theta, doc_ids.device)
        h = byte_states
        for cross, block in zip(self.cross_attentions, self.layers):
            h = cross(h, memory, reading)
            h = block(h, attention, rope)
        return self.output(self.norm(h))

    def patch_memory(self, latent_states: torch.Tensor) -> torch.Tensor:
        """Latent states [B, P, D] -> the k vectors per patch the bytes read, [B, P * k, d]."""
        vectors = self.patch_proj(self.latent_norm(latent_states))
        return vectors.reshape(latent_states.shape[0], -1, self.cfg.decoder.dim)

    def forward_byte(self, byte_state: torch.Tensor, memory: Optional[torch.Tensor], cache: StackCache) -> torch.Tensor:
        """Logits [1, 1, 260] of the next byte from its encoder state and the k vectors of the
        one patch it may read (None: no completed patch yet, an empty read adds exact zeros)."""
        dec = self.cfg.decoder
        rope = cached_rope(cache, 1, dec.dim // dec.n_heads, self.cfg.rope_theta, byte_state.device)
        h = byte_state
        for cross, block, layer_cache in zip(self.cross_attentions, self.layers, cache.layers):
            if memory is not None:
                h = cross(h, memory, every_key_attention)
            h = block.forward_cached(h, rope, layer_cache)
        cache.position += 1
        return self.output(self.norm(h))


class BLT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = LocalEncoder(cfg)
        self.latent = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_heads, cfg.ffn_hidden(cfg.dim), cfg.n_kv_heads, cfg.norm_eps)
            for _ in range(cfg.n_layers)
        )
        self.decoder = LocalDecoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """Re-initialises every parameter (also after `to_empty` from the meta device)."""
        self.encoder.init_weights()
        for block in self.latent:
            block.init_weights(self.cfg.init_std, residual_std(self.cfg.init_std, self.cfg.n_layers))
        self.decoder.init_weights()

    # -- stages ----------------------------------------------------------------------------------

    def encode(self, tokens: torch.Tensor, patch_lengths: torch.Tensor, doc_ids: torch.Tensor,
               facts: Optional[BatchFacts] = None):
        """-> (patch_states [B, P, D], byte_states [B, C, d_local], patch_lengths, doc_ids)."""
        layout = patch_layout(patch_lengths, doc_ids)
        patch_states, byte_states = self.encoder(tokens, doc_ids, layout, facts)
        return patch_states, byte_states, patch_lengths, doc_ids

    def latent_mask_and_rope(self, patch_lengths: torch.Tensor, doc_ids: torch.Tensor,
                             facts: Optional[BatchFacts] = None) -> tuple:
        return latent_mask_and_rope(self.cfg, patch_lengths, doc_ids, facts)

    def decode(self, patch_states: torch.Tensor, byte_states: torch.Tensor, patch_lengths: torch.Tensor,
               doc_ids: torch.Tensor, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        """-> logits [B, C, 260]; byte i predicts byte i+1."""
        return self.decoder(patch_states, byte_states, doc_ids, patch_layout(patch_lengths, doc_ids), facts)

    def forward(self, tokens: torch.Tensor, patch_lengths: torch.Tensor, doc_ids: torch.Tensor,
                facts: Optional[BatchFacts] = None) -> torch.Tensor:
        """facts: the loader's layout facts of the batch (model.batch_facts), so that setting up
        attention reads no device value; None: read from the tensors."""
        patch_states, byte_states, patch_lengths, doc_ids = self.encode(tokens, patch_lengths, doc_ids, facts)
        mask, rope = self.latent_mask_and_rope(patch_lengths, doc_ids, facts)
        for block in self.latent:
            patch_states = block(patch_states, mask, rope)
        return self.decode(patch_states, byte_states, patch_lengths, doc_ids, facts)

    # -- incremental decoding (one document, one byte at a time) --------------------------------

    def new_cache(self) -> "BLTCache":
        cfg = self.cfg
        return BLTCache(StackCache(len(self.encoder.layers), cfg.encoder.window),
                        StackCache(len(self.latent), cfg.attention_window),
                        StackCache(len(self.decoder.layers), cfg.decoder.window))

    def step(self, token: int, closes_patch: bool, cache: "BLTCache") -> torch.Tensor:
        """Logits [1, 1, 260] at the next byte (id `token`), as `forward` gives them for a layout
        in which this byte ends its patch iff `closes_patch`. The first byte of a document is
        its BOS; a patch holds the bytes since the last one that closed a patch."""
        device = self.encoder.byte_embedding.weight.device
        cache.recent_tokens = (cache.recent_tokens + [int(token)])[-max(self.cfg.hash.ngram_sizes):]
        recent = torch.tensor([cache.recent_tokens], device=device)
        byte_state = self.encoder.forward_byte(recent, cache.encoder)
        cache.open_patch.append(byte_state)
        if closes_patch:
            patch_state = self.encoder.pool_patch(torch.cat(cache.open_patch, dim=1))
            cache.open_patch = []
            rope = cached_rope(cache.latent, 1, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, device)
            for block, layer_cache in zip(self.latent, cache.latent.layers):
                patch_state = block.forward_cached(patch_state, rope, layer_cache)
            cache.latent.position += 1
            cache.memory = self.decoder.patch_memory(patch_state)
        # A closing byte reads the patch it closes, any other the latest completed one.
        return self.decoder.forward_byte(byte_state, cache.memory, cache.decoder)


@dataclass
class BLTCache:
    """What `BLT.step` carries from one byte to the next, for one document."""

    encoder: StackCache  # encoder self-attention (window encoder.window)
    latent: StackCache  # the latent blocks over completed patches (position = patches so far)
    decoder: StackCache  # decoder self-attention (window decoder.window)
    recent_tokens: list = field(default_factory=list)  # the last max(n) ids: the next byte's hash n-grams
    open_patch: list = field(default_factory=list)  # encoder states [1, 1, d] of the open patch's bytes
    memory: Optional[torch.Tensor] = None  # [1, k, d]: the latest completed patch, as the decoder reads it


def latent_mask_and_rope(cfg: ModelConfig, patch_lengths: torch.Tensor, doc_ids: torch.Tensor,
                         facts: Optional[BatchFacts] = None) -> tuple:
    """The latent blocks' attention (causal over patches, never across documents) and rotary
    tables; a function of the config so that pipeline stages, which hold blocks but not the
    BLT, rebuild the same ones from the layout tensors they carry."""
    layout = patch_layout(patch_lengths, doc_ids)
    num_patches, device = layout.num_patches, doc_ids.device
    patch_doc = layout.patch_doc
    if resolve_mode(cfg.attention, device) != "dense":
        patch_doc = latent_patch_doc(patch_doc)
    attention = self_attention(cfg.attention, num_patches, patch_doc, cfg.attention_window, device,
                               facts.patches if facts else None)
    rope = rotary_cos_sin(num_patches, cfg.dim // cfg.n_heads, cfg.rope_theta, device)
    return attention, rope


def latent_patch_doc(patch_doc: torch.Tensor) -> torch.Tensor:
    """The latent's document of each patch, outside the dense reference. Empty patches (trailing,
    document -1) are never read by a byte (see patch_layout), so what the latent computes for
    them cannot reach a logit or a gradient. Letting them join the row's last document turns a
    one-document row into plain causal attention (no mask); the dense reference keeps them apart."""
    last_doc = patch_doc.gather(1, ((patch_doc >= 0).sum(1, keepdim=True) - 1).clamp(min=0))
    return torch.where(patch_doc >= 0, patch_doc, last_doc)


def blt_batch_facts(patch_lengths: torch.Tensor, doc_ids: torch.Tensor) -> BatchFacts:
    """A BLT batch's layout facts, from its host tensors (the loader calls this per batch)."""
    patch_doc = latent_patch_doc(patch_layout(patch_lengths, doc_ids).patch_doc)
    longest = int(patch_lengths.max()) if patch_lengths.numel() else 1
    return BatchFacts(SequenceFacts.of(doc_ids), SequenceFacts.of(patch_doc), longest)
