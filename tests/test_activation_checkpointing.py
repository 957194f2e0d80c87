"""Activation checkpointing recomputes blocks in backward: same loss, same gradients, same names."""
from __future__ import annotations

import copy

import pytest
import torch

from blt_dist.config import load_config
from blt_dist.model import build_model
from blt_dist.parallel.engine import apply_activation_checkpointing


@pytest.mark.parametrize("config", ["configs/blt/tiny.yaml", "configs/entropy/tiny.yaml"])
def test_same_loss_and_gradients(config):
    cfg = load_config(config)
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped) > 0
    assert plain.state_dict().keys() == wrapped.state_dict().keys()  # checkpoints stay interchangeable
    tokens = torch.randint(4, 260, (2, 64))
    doc_ids = torch.zeros(2, 64, dtype=torch.long)
    inputs = (tokens, torch.full((2, 16), 4), doc_ids) if cfg.model.family == "blt" else (tokens, doc_ids)
    losses = []
    for model in (plain, wrapped):
        loss = model(*inputs).float().logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
