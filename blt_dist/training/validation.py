"""In-loop validation: bits per byte on one fixed set of whole validation documents.

The documents are those `compare` scores by default: the validation split of data.val (all of a
held-out dataset prepared with --val-fraction 0, which has only a train split), whole
documents of each content type up to train.eval_bytes (evaluation.evaluate.take_per_type), so
every family, micro-batch, layout and world size sees the same bytes. They are scored by
evaluation.evaluate.score_documents, the function behind evaluate_model (and so `compare` and
`blt-dist eval`), with the training engine as the model:

Every rank packs all the documents the same way (compare's packing, at the training shapes),
so a document's context never depends on the world size; the packed batches are then split:

- ZeRO-0/1/2: data-parallel rank r scores batches r, r + N, ...;
- ZeRO-3: every rank scores every batch (its forward gathers parameters in lock step);
- pipeline: each data-parallel group scores its share through eval_batch, padded to the static
  micro-batch shape; the last stage holds the NLL.

Per-batch sums are gathered to every rank and added in batch order; a document that no batch
scored is an error. Against `compare`'s score of the same export the total differs only by
float rounding (the batch sizes differ: rows are computed in other groupings).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blt_dist.config import Config
from blt_dist.errors import UserError
from blt_dist.evaluation.evaluate import (
    Encoder,
    encode_documents,
    heldout_documents,
    per_document,
    plain_forward,
    score_documents,
)
from blt_dist.model.loss import LossSums
from blt_dist.parallel.collectives import all_gather_object
from blt_dist.parallel.pipeline import pipeline_batch


@dataclass
class ValidationSet:
    # encode_documents' (info, encoded) per document, in a fixed order: encoded once at set-up (a
    # BLT's entropy-model pass included), scored at every validation
    documents: list
    encoder: Encoder
    bytes: int

    @classmethod
    def from_config(cls, cfg: Config) -> "ValidationSet":
        encoder = Encoder(cfg, None, None)
        # the val split, or all of a held-out dataset prepared with --val-fraction 0 (as `compare`)
        picked = enumerate(heldout_documents(cfg.data.val, [], None, cfg.train.eval_bytes,
                                             cache_dir=cfg.data.cache_dir))
        documents = list(encode_documents(encoder, picked))
        if not documents:
            raise UserError(f"data.val: {cfg.data.val} holds no documents to validate on")
        return cls(documents, encoder, sum(info["bytes"] for info, _ in documents))

    def describe(self, cfg: Config) -> str:
        limit = f"up to {cfg.train.eval_bytes:,} bytes per content type" if cfg.train.eval_bytes else "all of them"
        return (f"{len(self.documents)} whole validation documents ({self.bytes:,} bytes; {limit}) of "
                f"{cfg.data.val}, scored as `compare` scores them")


def pipeline_forward(engine, family: str):
    """forward(batch) -> per-token NLL on the last stage, None on the others."""
    loss_fn = engine.module.loss_fn

    def forward(batch: dict):
        loss_fn.keep_token_nll = True
        try:
            engine.eval_batch(iter([pipeline_batch(batch, family)]), num_micro_batches=1)
        finally:
            loss_fn.keep_token_nll = False
        return loss_fn.take_token_nll() if engine.is_last_stage() else None

    return forward


def validate(engine, cfg: Config, validation: ValidationSet, device, dp_rank: int, dp_size: int) -> LossSums:
    """The validation documents' summed NLL, predicted targets and bytes, on every rank."""
    family = cfg.model.family
    pipelined = cfg.parallel.pipeline_stages > 1
    every_rank_scores_all = cfg.parallel.zero_stage >= 3
    shard = (0, 1) if every_rank_scores_all else (dp_rank, dp_size)
    if pipelined:
        forward, full = pipeline_forward(engine, family), True
    else:
        forward, full = plain_forward(engine, family, device), False
    engine.eval()
    with torch.no_grad():
        _, scored = score_documents(forward, cfg, validation.encoder, validation.documents,
                                    cfg.train.micro_batch_size, full, shard)
    engine.train()
    if not every_rank_scores_all:  # each batch was scored by one process: put them together
        scored = {number: sums for part in all_gather_object(scored) for number, sums in part.items()}
    nll, targets = per_document(scored)
    if len(nll) != len(validation.documents):
        missing = sorted({info["index"] for info, _ in validation.documents} - set(nll))[:5]
        raise RuntimeError(f"validation: {len(validation.documents) - len(nll)} documents were not scored "
                           f"(first: {missing})")
    total_nll = sum(nll[index] for index in sorted(nll))
    total_targets = sum(targets[index] for index in sorted(targets))
    return LossSums(total_nll, total_targets, validation.bytes)
