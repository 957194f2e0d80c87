"""Layers shared by every model: RMSNorm, rotary embeddings, SwiGLU, attention blocks.

Which keys a query may see, and how that is computed, is not decided here: blocks take an
attention kernel built from integer layout tensors (document ids, patch ids) by
model/attention.py, once per forward, and call it on their projected q, k, v. A boolean mask
tensor (True = may attend) is accepted too and runs the dense reference (masked SDPA).

Incremental decoding (generation): `forward_cached` on Attention / TransformerBlock takes the
new positions only and a `KVCache` holding the keys and values of the earlier ones (rotary
already applied at their absolute positions), so each new position costs O(window) instead
of a forward over the whole sequence. It computes what `forward` computes at those positions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from blt_dist.model.attention import (  # noqa: F401  (masks re-exported: the reference path)
    DenseCrossAttention,
    DenseSelfAttention,
    Kernel,
    masked_sdpa,
    self_attention_mask,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings. Computed on the fly from positions (no buffers): cheap next to
# the matmuls, works on the meta device, and needs no maximum sequence length in the config.


def rotary_cos_sin(length: int, head_dim: int, theta: float, device,
                   start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for positions start .. start + length - 1 (start > 0: the new positions of an
    incremental step; the rows equal those of a table built from 0)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()  # [T, head_dim / 2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; rotates interleaved pairs (x[2i], x[2i+1]) by the angles.

    As one complex multiplication, (x0 + i x1)(cos + i sin): the same products and sums as
    (x0 cos - x1 sin, x0 sin + x1 cos), bit for bit, in one kernel instead of six strided ones
    and a stack (4-6x faster forward + backward on CPU, measured at 256-2048 positions)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Key/value caches for incremental decoding


class KVCache:
    """One self-attention layer's keys and values [B, kv_heads, positions, head_dim] for the
    positions decoded so far. With a window only the last `window` positions are kept: no later
    query may see older ones (query i sees keys i-window+1..i), so memory and work per new
    position stay O(window)."""

    def __init__(self, window: Optional[int] = None):
        self.window = window
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.first = 0  # absolute position of the first kept key

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Appends the new positions' keys and values; returns (kept + new keys, values, the
        absolute position of the first returned key). Trims to the window afterwards."""
        first = self.first
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        if self.window is not None and keys.shape[2] > self.window:
            drop = keys.shape[2] - self.window
            self.keys, self.values = keys[:, :, drop:], values[:, :, drop:]
            self.first = first + drop
        return keys, values, first


class StackCache:
    """The caches of a stack of self-attention blocks (one KVCache per block) and the absolute
    position of the next input: what CausalLM, the BLT's local models and its latent
    transformer carry from one incremental step to the next."""

    def __init__(self, n_layers: int, window: Optional[int]):
        self.layers = [KVCache(window) for _ in range(n_layers)]
        self.position = 0


def cached_rope(cache: StackCache, length: int, head_dim: int, theta: float, device) -> tuple:
    """Rotary tables for the next `length` positions of a cached stack."""
    return rotary_cos_sin(length, head_dim, theta, device, start=cache.position)


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `kv is None`; cross-attention otherwise
    (then without rotary embeddings: queries and keys live on different position axes)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: Optional[int] = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, attention: Kernel | torch.Tensor, rope: Optional[tuple] = None,
                kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`attention`: a kernel from model/attention.py, or a dense boolean mask [B, 1, Tq, Tk]."""
        if isinstance(attention, torch.Tensor):
            attention = DenseSelfAttention(attention) if kv is None else DenseCrossAttention(attention)
        source = x if kv is None else kv
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.wk(source).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(source).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = attention(q, k, v)
        return self.wo(out.transpose(1, 2).flatten(-2))

    def forward_cached(self, x: torch.Tensor, rope: tuple, cache: KVCache) -> torch.Tensor:
        """Causal self-attention of the new positions x [B, t, D] (rope: their tables) over
        the cached keys and themselves: `forward` with the causal/window mask of one document,
        at those positions."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        new = x.shape[1]
        k, v, first = cache.extend(k, v)
        if self.n_kv_heads != self.n_heads:  # the cache keeps the kv heads unrepeated
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        window = cache.window
        if new == 1:
            # One query sees every kept key inside its window: no mask at all.
            if window is not None:
                k, v = k[:, :, -window:], v[:, :, -window:]
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            end = first + k.shape[2]
            query_pos = torch.arange(end - new, end, device=x.device)[:, None]
            distance = query_pos - torch.arange(first, end, device=x.device)[None, :]
            allowed = distance >= 0
            if window is not None:
                allowed = allowed & (distance < window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(out.transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, n_kv_heads: Optional[int] = None,
                 eps: float = 1e-5):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = SwiGLU(dim, ffn_hidden)

    def forward(self, x: torch.Tensor, attention: Kernel | torch.Tensor, rope: tuple) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), attention, rope)
        return x + self.feed_forward(self.ffn_norm(x))

    def forward_cached(self, x: torch.Tensor, rope: tuple, cache: KVCache) -> torch.Tensor:
        """`forward` for new positions only (see Attention.forward_cached)."""
        x = x + self.attention.forward_cached(self.attention_norm(x), rope, cache)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        init_attention(self.attention, std, out_std)
        nn.init.trunc_normal_(self.feed_forward.w1.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.feed_forward.w3.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.feed_forward.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class CrossAttentionBlock(nn.Module):
    """queries + attn(norm(queries), norm(memory)); no FFN (as in the reference). With
    `double_residual` (the meta layout) queries + (queries + attn(...)), as HF/Meta compute it."""

    def __init__(self, dim: int, n_heads: int, eps: float = 1e-5, double_residual: bool = False):
        super().__init__()
        self.double_residual = double_residual
        self.query_norm = RMSNorm(dim, eps)
        self.memory_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, attention: Kernel | torch.Tensor) -> torch.Tensor:
        out = self.attention(self.query_norm(queries), attention, kv=self.memory_norm(memory))
        return queries + (queries + out) if self.double_residual else queries + out

    def init_weights(self, std: float, out_std: float) -> None:
        self.query_norm.reset_parameters()
        self.memory_norm.reset_parameters()
        init_attention(self.attention, std, out_std)


def init_attention(attention: Attention, std: float, out_std: float) -> None:
    for linear in (attention.wq, attention.wk, attention.wv):
        nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
    nn.init.trunc_normal_(attention.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


def init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)


def residual_std(std: float, n_layers: int) -> float:
    """Output projections into the residual stream shrink with depth (GPT-2 / Llama init)."""
    return std / math.sqrt(2 * max(n_layers, 1))
