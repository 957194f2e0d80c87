"""Model code: pure PyTorch modules, no distributed code (see DESIGN.md).

    model = build_model(cfg.model)        # CausalLM (entropy, bpe, byte) or BLT (blt)
    logits = model(*model_inputs(batch, cfg.model.family, device))

Read in this order: layers.py (norm, rotary, SwiGLU, attention blocks), attention.py (which
keys each query sees, and the dense / blocked / GPU kernels that compute it), transformer.py
(the LM), hash_embeddings.py, blt.py (encoder -> latent -> decoder and the causal patch rule),
loss.py (NLL and bits per byte), weights.py (loading an export).
Owns the modules and their inputs; imports only torch, vocab, errors and config.
"""
from __future__ import annotations

from torch import nn

from blt_dist.config.model import ModelConfig
from blt_dist.errors import ConfigError
from blt_dist.model.attention import BatchFacts, SequenceFacts
from blt_dist.model.blt import BLT, blt_batch_facts, patch_layout
from blt_dist.model.transformer import CausalLM

__all__ = ["BLT", "BatchFacts", "CausalLM", "ModelConfig", "batch_facts", "build_model", "model_inputs",
           "patch_layout"]


def build_model(model_cfg: ModelConfig) -> nn.Module:
    """The model for `model_cfg.family`, initialised on the current default device.

    For big models build on the meta device (`with torch.device("meta"): build_model(cfg)`),
    then `to_empty(device=...)` and `init_weights()`.
    """
    problems = model_cfg.validate("model")
    if problems:
        raise ConfigError(*problems[0])
    if model_cfg.family == "blt":
        return BLT(model_cfg)
    return CausalLM(model_cfg)


def model_inputs(batch: dict, family: str, device) -> tuple:
    """The forward's arguments from a loader batch (the model's input contract): a BLT takes
    byte ids, patch lengths and document ids; the LMs take ids and document ids. Both take the
    batch's layout facts when the loader made them (batch["facts"], see batch_facts)."""
    facts = (batch["facts"],) if "facts" in batch else ()
    if family == "blt":
        return batch["tokens"].to(device), batch["patch_lengths"].to(device), batch["doc_ids"].to(device), *facts
    return batch["tokens"].to(device), batch["doc_ids"].to(device), *facts


def batch_facts(batch: dict, family: str) -> BatchFacts:
    """The layout facts of a batch of host tensors, which the attention set-up would otherwise
    read from device tensors in every forward (a host sync each on a GPU)."""
    if family == "blt":
        return blt_batch_facts(batch["patch_lengths"], batch["doc_ids"])
    return BatchFacts(SequenceFacts.of(batch["doc_ids"]))
