"""The causal transformer LM, used twice: the byte-level entropy model and the BPE baseline.

Llama-style: token embedding, pre-norm blocks (RMSNorm, RoPE attention, SwiGLU), final norm,
untied output head. Attention is causal, never crosses a document (`doc_ids`), and for the
entropy model is limited to a sliding window (512 bytes by default). How it is computed
(`cfg.attention`, model/attention.py): plain causal SDPA when every row is one document,
otherwise blocks that skip the keys no query may see (O(T * window) with a window).

Split for pipeline parallelism: `embed` -> each of `blocks` (with `mask_and_rope`) -> `head`.
`forward` is exactly that composition.

Generation: `forward_cached(tokens, cache)` takes only the new tokens of one document and a
cache from `new_cache()` (keys/values per block, the last `window` positions with a window)
and returns the logits `forward` gives at those positions of the whole sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from blt_dist.config.model import ModelConfig
from blt_dist.model.attention import BatchFacts, self_attention
from blt_dist.model.layers import (
    RMSNorm,
    StackCache,
    TransformerBlock,
    cached_rope,
    init_linear,
    residual_std,
    rotary_cos_sin,
)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.attention_window
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_heads, cfg.ffn_hidden(cfg.dim), cfg.n_kv_heads, cfg.norm_eps)
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Re-initialises every parameter (also after `to_empty` from the meta device)."""
        std = self.cfg.init_std
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        for block in self.blocks:
            block.init_weights(std, residual_std(std, self.cfg.n_layers))
        self.norm.reset_parameters()
        init_linear(self.output, self.cfg.dim ** -0.5)

    # -- stages ----------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    def mask_and_rope(self, length: int, doc_ids: Optional[torch.Tensor], device,
                      facts: Optional[BatchFacts] = None) -> tuple:
        return lm_mask_and_rope(self.cfg, length, doc_ids, device, facts)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))

    def forward(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                facts: Optional[BatchFacts] = None) -> torch.Tensor:
        """tokens, doc_ids: [B, T] -> logits [B, T, vocab]. Position i predicts token i+1.

        Padding (doc id -1 from the loaders) is its own document, so it never reaches a real
        position; without doc_ids, padding at the end is harmless because attention is causal.
        """
        h = self.embed(tokens)
        attention, rope = self.mask_and_rope(tokens.shape[1], doc_ids, tokens.device, facts)
        for block in self.blocks:
            h = block(h, attention, rope)
        return self.head(h)

    # -- incremental decoding --------------------------------------------------------------------

    def new_cache(self) -> StackCache:
        return StackCache(len(self.blocks), self.window)

    def forward_cached(self, tokens: torch.Tensor, cache: StackCache) -> torch.Tensor:
        """tokens [B, t]: the next t tokens of each row (one document per row, started at the
        cache's first call) -> logits [B, t, vocab], as `forward` over the whole sequence."""
        return self.head(self.hidden_cached(tokens, cache))

    def hidden_cached(self, tokens: torch.Tensor, cache: StackCache) -> torch.Tensor:
        """forward_cached without the head: the final hidden states [B, t, dim] (the entropy
        pass runs the head itself, in fp32)."""
        h = self.embed(tokens)
        rope = cached_rope(cache, tokens.shape[1], self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, tokens.device)
        for block, layer_cache in zip(self.blocks, cache.layers):
            h = block.forward_cached(h, rope, layer_cache)
        cache.position += tokens.shape[1]
        return h


def lm_mask_and_rope(cfg: ModelConfig, length: int, doc_ids: Optional[torch.Tensor], device,
                     facts: Optional[BatchFacts] = None) -> tuple:
    """The blocks' attention kernel and rotary tables; a function of the config so that pipeline
    stages (parallel/pipeline.py), which hold blocks but not the CausalLM, rebuild the same ones.
    facts: the loader's layout facts of the batch (model.batch_facts), or None."""
    attention = self_attention(cfg.attention, length, doc_ids, cfg.attention_window, device,
                               facts.positions if facts else None)
    rope = rotary_cos_sin(length, cfg.dim // cfg.n_heads, cfg.rope_theta, device)
    return attention, rope
