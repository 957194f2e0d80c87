"""Attention patterns and the kernels that compute them, chosen by `model.attention`.

Every attention in the models is one of three patterns, described by integer layout tensors:

    self-attention     causal, optionally windowed (query i sees keys i-window+1..i), never
                       across documents (doc ids)                    encoder, decoder, latent, LMs
    patch read         byte i reads the k vectors of the one patch it may read (or nothing)
                                                                     decoder cross-attention
    patch pooling      patch p's k queries read that patch's bytes (empty patch: nothing)
                                                                     encoder cross-attention

A builder below turns a pattern into a kernel: a callable `kernel(q, k, v) -> out` on
[B, H, T, head_dim] tensors (the SDPA layout), built once per forward and shared by the layers.
Modes (`model.attention`):

    dense    [B, 1, Tq, Tk] boolean masks + SDPA. The reference: every fast path is tested
             against it (tests/test_attention_equivalence.py). Work and memory O(T^2).
    blocked  exact fast paths in plain torch, on any device:
             - self-attention, every row one document and no window: SDPA `is_causal`
               (no mask at all; the flash kernel on GPU);
             - otherwise blocks: each query block attends only to the key blocks from the
               first one any of its queries may see (document start, window) to its own,
               with the dense mask applied inside that range: O(T W) work and memory with a
               window W, and with documents no key before the earliest document start;
             - patch read: a gather of the k vectors + a softmax over k, O(C k);
             - patch pooling: a padded gather of each patch's bytes, O(P k L).
    flex     (CUDA) self-attention by compiled flex_attention with a block mask; the rest as
             blocked. torch's CPU flex_attention has no backward (pytorch#148752).
    flash    (CUDA) self-attention by flash varlen attention (documents as sequences, the
             window as flash's left window) in half precision; the rest as blocked.
    auto     the fastest exact path for the device: on CUDA flash (varlen flash attention for
             documents and windows in bf16/fp16, is_causal SDPA (the flash kernel) without
             them, blocked in fp32); elsewhere blocked. flex is opt-in: it compiles per shape.

Rows no query may attend from (an empty patch, a byte with no completed patch) give exact
zeros with zero gradient, in every mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from blt_dist.config.model import ATTENTION_MODES
from blt_dist.errors import ConfigError

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Queries per block of the blocked kernel. Measured on CPU (fwd+bwd, window 512, head dim 32):
# blocks of 128 ran 1.5x faster than blocks of 512 (less of each key range is masked; the
# extra copies of K/V are head_dim wide while the scores are key-range wide).
MAX_QUERY_BLOCK = 128


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode actually run: `auto` -> flash on CUDA, blocked elsewhere; flex/flash refused off CUDA."""
    if mode not in ATTENTION_MODES:
        raise ConfigError("model.attention", f"one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    if mode == "auto":
        return "flash" if torch.device(device).type == "cuda" else "blocked"
    if mode in ("flex", "flash") and torch.device(device).type != "cuda":
        raise ConfigError("model.attention", f"{mode!r} needs a CUDA device (running on {device}); "
                          f"use auto or blocked on CPU (torch's CPU flex_attention has no backward)")
    return mode


# ---------------------------------------------------------------------------------------------
# The dense reference (boolean masks, True = may attend), shaped [B or 1, 1, Tq, Tk]


def self_attention_mask(length: int, doc_ids: Optional[torch.Tensor], window: Optional[int],
                        device) -> torch.Tensor:
    """Causal, optionally windowed (query i sees keys i-window+1..i), never across documents."""
    pos = torch.arange(length, device=device)
    distance = pos[:, None] - pos[None, :]
    mask = distance >= 0
    if window is not None:
        mask = mask & (distance < window)
    mask = mask[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA that returns exact zeros (not NaN) for query rows with nothing to attend to.

    Such rows are real: an empty (padding) patch in the encoder's pooling, or a byte with no
    completed patch before it in the decoder. A fully-False row makes SDPA's softmax 0/0.
    We let those rows attend everywhere (a finite result) and then select zeros, so neither
    the output nor the gradient depends on the keys they were never allowed to see.
    """
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


class DenseSelfAttention:
    """SDPA with a [B, 1, T, T] mask. Self-attention masks always allow the diagonal, so no
    row is empty (and at 8k bytes the guard's extra masks per layer would not be free)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class DenseCrossAttention:
    """masked_sdpa with a [B, 1, Tq, Tk] mask (rows may be empty)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, q, k, v):
        return masked_sdpa(q, k, v, self.mask)


# ---------------------------------------------------------------------------------------------
# Layout facts: what the kernel choice reads from doc_ids, known before the forward


@dataclass(frozen=True)
class SequenceFacts:
    """Facts about one [B, T] doc_ids tensor that decide the self-attention kernel. Reading them
    from a device tensor in the forward is a host sync per attention set-up (on a GPU, a stall
    that empties the launch queue), so the loader computes them on its host copy of the batch
    (`model.batch_facts`) and they travel with it. Without them (evaluation, pipeline stages)
    the set-up reads the tensors itself."""

    one_document: bool  # every row is one document (no padding): no document mask at all
    runs: bool  # every document is one contiguous run of its row (the loaders' packing)
    cu_seqlens: torch.Tensor  # int32 [N + 1], host: the runs, cut at row ends (flash's sequences)
    longest: int  # the longest run
    first_key: torch.Tensor  # int64 [T], host: each position's document start, lowest over the rows

    @classmethod
    def of(cls, doc_ids: torch.Tensor) -> "SequenceFacts":
        cu_seqlens, longest = run_sequences(doc_ids)
        return cls(bool((doc_ids == doc_ids[:, :1]).all()), documents_are_runs(doc_ids), cu_seqlens, longest,
                   document_starts(doc_ids).amin(dim=0))


@dataclass(frozen=True)
class BatchFacts:
    """A batch's layout facts: its positions (bytes or tokens) and, for a BLT, its latent
    patch sequence and longest patch (the pooling gather's width)."""

    positions: SequenceFacts
    patches: Optional[SequenceFacts] = None
    longest_patch: Optional[int] = None


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the position where each position's document (run of equal ids) starts."""
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    run_start = torch.ones_like(doc_ids, dtype=torch.bool)
    run_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(run_start, positions, 0).cummax(dim=1).values


def run_sequences(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N + 1], longest sequence): runs of equal doc ids, cut at row ends."""
    run_start = torch.ones_like(doc_ids, dtype=torch.bool)
    run_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # column 0 starts a run in every row
    starts = run_start.flatten().nonzero().flatten()
    bounds = torch.cat([starts, starts.new_tensor([doc_ids.numel()])])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


# ---------------------------------------------------------------------------------------------
# Self-attention


def self_attention(mode: str, length: int, doc_ids: Optional[torch.Tensor], window: Optional[int],
                   device, facts: Optional[SequenceFacts] = None) -> Kernel:
    """The kernel for causal self-attention over `length` positions (see the module docstring).

    doc_ids [B, length] (None: one document per row); documents are contiguous runs of equal
    ids, as the loaders make them (a row where an id comes back after another runs dense).
    facts: doc_ids' SequenceFacts, read on the host (None: read here, a host sync on a GPU)."""
    mode = resolve_mode(mode, device)
    if mode == "dense":
        return DenseSelfAttention(self_attention_mask(length, doc_ids, window, device))
    if window is not None and window >= length:
        window = None  # a window the row cannot exceed changes nothing
    if doc_ids is not None and (facts.one_document if facts else bool((doc_ids == doc_ids[:, :1]).all())):
        doc_ids = None  # every row is one document: no document mask needed
    if mode == "flex":
        return FlexSelfAttention(length, doc_ids, window, device)
    if mode == "flash" and (doc_ids is not None or window is not None):
        if doc_ids is None or _are_runs(doc_ids, facts):  # flash's sequences are runs of ids
            return FlashSelfAttention(length, doc_ids, window, device, facts)
    # blocked, and flash without documents or window: is_causal SDPA is the flash kernel on GPU.
    return blocked_self_attention(length, doc_ids, window, device, facts)


def blocked_self_attention(length: int, doc_ids: Optional[torch.Tensor], window: Optional[int],
                           device, facts: Optional[SequenceFacts] = None) -> Kernel:
    """is_causal SDPA where nothing but causality applies, else the blocked kernel."""
    if doc_ids is None and window is None:
        return CausalSelfAttention()
    if doc_ids is not None and not _are_runs(doc_ids, facts):
        return DenseSelfAttention(self_attention_mask(length, doc_ids, window, device))
    return BlockedSelfAttention(length, doc_ids, window, query_block(length), device, facts)


def _are_runs(doc_ids: torch.Tensor, facts: Optional[SequenceFacts]) -> bool:
    return facts.runs if facts is not None else documents_are_runs(doc_ids)


def documents_are_runs(doc_ids: torch.Tensor) -> bool:
    """True if in every row each id forms one contiguous run (as the loaders make them). An id
    that comes back after another is one document to the dense mask, which only it computes."""
    run_starts = 1 + (doc_ids[:, 1:] != doc_ids[:, :-1]).sum(1)
    sorted_ids = doc_ids.sort(dim=1).values
    distinct = 1 + (sorted_ids[:, 1:] != sorted_ids[:, :-1]).sum(1)
    return torch.equal(run_starts, distinct)


def query_block(length: int) -> int:
    """Queries per block: 128 for long rows (measured best on CPU against 32..256 at 1k-8k
    positions, windows of 512 and none), an eighth of the row for short ones (at least 16)."""
    return max(16, min(MAX_QUERY_BLOCK, 2 ** math.ceil(math.log2(max(length, 1))) // 8))


class CausalSelfAttention:
    """One document per row, no window: plain causal SDPA, no mask built or read."""

    def __call__(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class BlockedSelfAttention:
    """Exact causal/window/document attention that computes only the key blocks a query block
    may see: O(T * W) with a window W; with documents, each query block reaches back only to
    the earliest start, over the rows, of its queries' documents (about half of dense when a
    document fills the row, far less when they are short).

    Queries in blocks of `block`; query block i attends to key blocks first_i .. i, where
    first_i holds the first key any of its queries may see in any row (the start of its
    document, or of its window). With a window W that is about W / block + 1 blocks: the
    "own block and the previous one" band of W-wide blocks, with smaller blocks so that less
    of the band is masked. Inside that range the dense mask applies (causal, window, same
    document). One SDPA call per query block; the key ranges are concatenations of whole key
    blocks (q, k, v split once), so the backward accumulates per block instead of writing a
    full-length gradient per slice.
    """

    def __init__(self, length: int, doc_ids: Optional[torch.Tensor], window: Optional[int], block: int, device,
                 facts: Optional[SequenceFacts] = None):
        """facts: doc_ids' SequenceFacts, whose host copy of the document starts lets the key
        ranges be planned without reading the device (None: read from doc_ids)."""
        self.block = block
        positions = torch.arange(length, device=device)
        if doc_ids is None:
            first_key = torch.zeros(length, dtype=torch.long)
        elif facts is not None:
            first_key = facts.first_key
        else:
            first_key = document_starts(doc_ids).amin(dim=0)  # the lowest over the rows
        if window is not None:
            first_key = first_key.clamp(min=torch.arange(length, device=first_key.device) - window + 1)
        # first_key never decreases along a row: a block's first query has the block's lowest.
        self.first_block = (first_key.cpu()[::block] // block).tolist()
        self.masks = []  # per query block: [B or 1, 1, its queries, its keys]
        for i, first in enumerate(self.first_block):
            queries, keys = slice(i * block, (i + 1) * block), slice(first * block, (i + 1) * block)
            distance = positions[queries, None] - positions[None, keys]
            allowed = distance >= 0
            if window is not None:
                allowed = allowed & (distance < window)
            allowed = allowed[None, None]
            if doc_ids is not None:
                allowed = allowed & (doc_ids[:, None, queries, None] == doc_ids[:, None, None, keys])
            self.masks.append(allowed)
        self._additive: dict[torch.dtype, list[torch.Tensor]] = {}

    def additive_masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The masks as additive float tensors, made once per dtype and shared by the layers:
        SDPA would otherwise convert each boolean mask in every layer (and keep one converted
        copy per layer for the backward)."""
        if dtype not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=self.masks[0].device)
            self._additive[dtype] = [torch.where(mask, zero, float("-inf")) for mask in self.masks]
        return self._additive[dtype]

    def __call__(self, q, k, v):
        q_blocks, k_blocks, v_blocks = (x.split(self.block, dim=2) for x in (q, k, v))
        outs = []
        for i, (first, mask) in enumerate(zip(self.first_block, self.additive_masks(q.dtype))):
            keys = k_blocks[i] if first == i else torch.cat(k_blocks[first:i + 1], dim=2)
            values = v_blocks[i] if first == i else torch.cat(v_blocks[first:i + 1], dim=2)
            outs.append(F.scaled_dot_product_attention(q_blocks[i], keys, values, attn_mask=mask))
        return torch.cat(outs, dim=2)


# ---------------------------------------------------------------------------------------------
# GPU self-attention (CUDA only; `resolve_mode` refuses them elsewhere)

_compiled_flex = None


def _flex_attention():
    """flex_attention compiled once per process (eager flex materialises the full score matrix)."""
    global _compiled_flex
    if _compiled_flex is None:
        # lazy: flex_attention imports torch._dynamo (about 1 s, measured); only the GPU modes use it
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexSelfAttention:
    """Compiled flex_attention with a BlockMask of the causal/window/document rule: the kernel
    skips fully masked blocks, so the work follows the layout. Built once per forward."""

    def __init__(self, length: int, doc_ids: Optional[torch.Tensor], window: Optional[int], device):
        from torch.nn.attention.flex_attention import create_block_mask  # lazy: torch._dynamo, ~1 s (GPU only)

        allowed = self.rule(doc_ids, window)
        batch = None if doc_ids is None else doc_ids.shape[0]
        # _compile: the eager builder evaluates the rule on every (query, key) pair, O(T^2) memory.
        self.block_mask = create_block_mask(allowed, batch, None, length, length, device=device, _compile=True)

    @staticmethod
    def rule(doc_ids: Optional[torch.Tensor], window: Optional[int]):
        """flex's mask_mod: the dense mask's rule, one (query, key) pair at a time."""

        def allowed(b, h, q_idx, kv_idx):
            ok = q_idx >= kv_idx
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
            if doc_ids is not None:
                ok = ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            return ok

        return allowed

    def __call__(self, q, k, v):
        return _flex_attention()(q, k, v, block_mask=self.block_mask)


class FlashSelfAttention:
    """Flash varlen attention: every document of every row is its own sequence (cu_seqlens over
    the flattened batch), the window is flash's left window (window - 1 keys before the query).
    Flash kernels exist for fp16/bf16 only: fp32 inputs (and a torch without varlen) take the
    blocked path, which is exact too."""

    def __init__(self, length: int, doc_ids: Optional[torch.Tensor], window: Optional[int], device,
                 facts: Optional[SequenceFacts] = None):
        self.length, self.doc_ids, self.window, self.device = length, doc_ids, window, device
        self._fallback: Optional[Kernel] = None
        self._sequences: Optional[tuple] = None
        if facts is not None:  # runs cut at row ends: also right when doc_ids was dropped as one per row
            self._sequences = (facts.cu_seqlens.to(device, non_blocking=True), facts.longest)

    def sequences(self, batch: int) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [N + 1], longest sequence): runs of equal doc ids, cut at row ends."""
        if self._sequences is None:
            doc_ids = self.doc_ids
            if doc_ids is None:
                doc_ids = torch.zeros(batch, self.length, dtype=torch.long, device=self.device)
            self._sequences = run_sequences(doc_ids)
        return self._sequences

    def __call__(self, q, k, v):
        try:
            from torch.nn.attention.varlen import varlen_attn  # lazy: torch._dynamo, ~1 s (GPU only)
        except ImportError:
            varlen_attn = None
        if varlen_attn is None or q.dtype not in (torch.float16, torch.bfloat16):
            if self._fallback is None:
                self._fallback = blocked_self_attention(self.length, self.doc_ids, self.window, self.device)
            return self._fallback(q, k, v)
        batch, heads, length, head_dim = q.shape
        cu_seqlens, longest = self.sequences(batch)

        def flat(x):  # [B, H, T, hd] -> [B * T, H, hd]
            return x.transpose(1, 2).reshape(batch * length, heads, head_dim)

        window = (-1, 0) if self.window is None else (self.window - 1, 0)
        out = varlen_attn(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, longest, longest, window_size=window)
        return out.view(batch, length, heads, head_dim).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Cross-attentions of the BLT


def every_key_attention(q, k, v):
    """Every query sees every key given. Incremental decoding (generation) hands the BLT's
    cross-attentions exactly the keys a query may read (the bytes of one patch, the k vectors
    of one patch), so no mask is needed there."""
    return F.scaled_dot_product_attention(q, k, v)



def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax in at least fp32 (as SDPA's kernels accumulate), whatever the autocast dtype."""
    return scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))



def patch_read_attention(mode: str, read_patch: torch.Tensor, can_read: torch.Tensor, num_patches: int,
                         k: int) -> Kernel:
    """Decoder cross-attention: byte i reads the k vectors of patch read_patch[i] (keys laid
    out [B, P * k]: patch p's vectors at p*k .. p*k+k-1), or nothing where can_read is False."""
    mode = resolve_mode(mode, read_patch.device)
    if mode == "dense":
        key_patch = torch.arange(num_patches, device=read_patch.device).repeat_interleave(k)
        mask = (read_patch[:, None, :, None] == key_patch[None, None, None, :]) & can_read[:, None, :, None]
        return DenseCrossAttention(mask)
    return PatchReadAttention(read_patch, can_read, k)


class PatchReadAttention:
    """Each byte gathers its patch's k keys and values and takes a softmax over those k: O(C k)."""

    def __init__(self, read_patch: torch.Tensor, can_read: torch.Tensor, k: int):
        self.k = k
        self.read_patch = read_patch.clamp(min=0)  # unreadable bytes gather patch 0, then get zeros
        self.can_read = can_read[:, None, :, None]  # [B, 1, C, 1]
        self.rows = torch.arange(read_patch.shape[0], device=read_patch.device)[:, None]

    def __call__(self, q, k, v):
        batch, heads, _, head_dim = k.shape
        patches = k.shape[2] // self.k

        def gather(x):  # [B, H, P * k, hd] -> [B, C, H, k, hd]: the vectors of each byte's patch
            return x.view(batch, heads, patches, self.k, head_dim)[self.rows, :, self.read_patch]

        scores = torch.einsum("bhcd,bchkd->bhck", q, gather(k)) * head_dim ** -0.5
        weights = _softmax(scores).to(v.dtype)
        out = torch.einsum("bhck,bchkd->bhcd", weights, gather(v))
        # Bytes that may read nothing: exact zeros, and (through where) no gradient to what they gathered.
        return torch.where(self.can_read, out, torch.zeros((), dtype=out.dtype, device=out.device))


def patch_pool_attention(mode: str, byte_patch: torch.Tensor, patch_starts: torch.Tensor,
                         patch_lengths: torch.Tensor, k: int, longest_patch: Optional[int] = None) -> Kernel:
    """Encoder pooling: query slot s (patch s // k) reads exactly the bytes of its patch
    (byte_patch == s // k; byte_patch is P for padding bytes). Empty patches read nothing."""
    mode = resolve_mode(mode, byte_patch.device)
    if mode == "dense":
        num_patches = patch_lengths.shape[1]
        query_patch = torch.arange(num_patches, device=byte_patch.device).repeat_interleave(k)
        return DenseCrossAttention(byte_patch[:, None, None, :] == query_patch[None, None, :, None])
    return PatchPoolAttention(patch_starts, patch_lengths, byte_patch.shape[1], k, longest_patch)


class PatchPoolAttention:
    """Each patch's k queries read its bytes, gathered as patch_start + arange(L) with L the
    longest patch in the batch (<= max_patch_length): O(P k L), keys [B, P, L]."""

    def __init__(self, patch_starts: torch.Tensor, patch_lengths: torch.Tensor, capacity: int, k: int,
                 longest: Optional[int] = None):
        """longest: the batch's longest patch, read on the host by the loader (None: read here)."""
        self.k = k
        if longest is None:
            longest = int(patch_lengths.max()) if patch_lengths.numel() else 1
        longest = max(longest, 1)
        offsets = torch.arange(longest, device=patch_lengths.device)
        self.byte_index = (patch_starts[..., None] + offsets).clamp(max=capacity - 1)  # [B, P, L]
        valid = (offsets < patch_lengths[..., None]) & (patch_starts[..., None] + offsets < capacity)
        self.nonempty = valid.any(-1)  # [B, P]
        # An empty patch's queries attend to its (clamped, arbitrary) slots and are zeroed after,
        # as masked_sdpa does: softmax over no keys at all would be 0/0.
        self.valid = (valid | ~self.nonempty[..., None])[:, None, :, None, :]  # [B, 1, P, 1, L]
        self.rows = torch.arange(patch_lengths.shape[0], device=patch_lengths.device)[:, None, None]

    def __call__(self, q, k, v):
        batch, heads, slots, head_dim = q.shape
        patches = slots // self.k

        def gather(x):  # [B, H, C, hd] -> [B, P, L, H, hd]: each patch's bytes
            return x[self.rows, :, self.byte_index]

        queries = q.view(batch, heads, patches, self.k, head_dim)
        scores = torch.einsum("bhpqd,bplhd->bhpql", queries, gather(k)) * head_dim ** -0.5
        scores = scores.masked_fill(~self.valid, float("-inf"))
        weights = _softmax(scores).to(v.dtype)
        out = torch.einsum("bhpql,bplhd->bhpqd", weights, gather(v))
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        out = torch.where(self.nonempty[:, None, :, None, None], out, zero)  # empty patches: exact zeros
        return out.reshape(batch, heads, slots, head_dim)
