"""Loss and bits per byte, the same for every family.

Targets come from the loaders (data/packing.py): IGNORE (vocab.py) where nothing is predicted (padding,
document starts), and `target_bytes`, the raw bytes each target stands for (1 per byte, 0 for
EOS, a token's byte length for BPE). The training loss is the mean NLL over predicted targets;
bits per byte is the summed NLL in nats over every predicted target (EOS included, for both
families) divided by ln 2 times the raw bytes predicted. Reductions in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blt_dist.vocab import IGNORE


@dataclass
class LossSums:
    """Sums that add up across micro-batches and ranks (all-reduce them as a tensor)."""

    nll: float = 0.0  # nats, summed over predicted targets
    targets: int = 0
    bytes: int = 0

    def add(self, other: "LossSums") -> "LossSums":
        return LossSums(self.nll + other.nll, self.targets + other.targets, self.bytes + other.bytes)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.nll, float(self.targets), float(self.bytes)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "LossSums":
        nll, targets, nbytes = t.tolist()
        return cls(nll, int(targets), int(nbytes))

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    @property
    def mean_nll(self) -> float:
        return self.nll / self.targets if self.targets else float("nan")


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in nats (fp32), 0 where the target is IGNORE."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)


def loss_and_sum_tensor(logits: torch.Tensor, targets: torch.Tensor,
                        target_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over predicted targets, for backward; the detached sums [nll, targets, bytes]
    as a float64 tensor on the logits' device). The training step adds these up on the device
    and reads them at log steps only: reading them here would stall a GPU's queue per micro-batch."""
    nll = token_nll(logits, targets)
    predicted = targets != IGNORE
    count = predicted.sum()
    loss = nll.sum() / count.clamp(min=1)
    sums = torch.stack([nll.detach().sum(dtype=torch.float64), count.to(torch.float64),
                        target_bytes[predicted].sum().to(torch.float64)])
    return loss, sums


def loss_and_sums(logits: torch.Tensor, targets: torch.Tensor, target_bytes: torch.Tensor) -> tuple[torch.Tensor, LossSums]:
    """(mean NLL over predicted targets, for backward; detached sums for logging/bpb)."""
    loss, sums = loss_and_sum_tensor(logits, targets, target_bytes)
    return loss, LossSums.from_tensor(sums.cpu())
