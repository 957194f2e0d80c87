"""One optimizer step over a step's micro-batches, plain or pipelined, and the sums it reduces.

Returns (loss sums, non-finite?, grad norm). A non-finite loss on any rank skips the update on
every rank: DeepSpeed skips it itself under ZeRO-1/2/3 and bf16; its ZeRO-0 fp32 path has no
overflow check, so the step is ended here without one.

The sums stay on the device (a float64 tensor [nll, targets, bytes], LossSums.as_tensor's layout)
and so does the grad norm: the loop reads them at log steps. A step reads one value on the host:
the agreed non-finite flag, which decides whether the update may run.
"""
from __future__ import annotations

import math

import torch

from blt_dist.model import model_inputs
from blt_dist.model.loss import LossSums, loss_and_sum_tensor
from blt_dist.parallel.collectives import all_reduce, reduce_int
from blt_dist.parallel.pipeline import pipeline_batch


def all_reduce_sums(sums: torch.Tensor, device) -> LossSums:
    """A window's device sums [nll, targets, bytes], summed over every rank, read on the host."""
    return LossSums.from_tensor(all_reduce(sums.to(device)).cpu())


def zero_sums(device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)


def plain_step(engine, batches, family, device, plain_optimizer: bool, poison: bool) -> tuple:
    """Forward/backward per micro-batch, one optimizer update: (sums, non-finite?, grad norm)."""
    total, nonfinite, gnorm = zero_sums(device), False, float("nan")
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in this step, on the device
    for batch in batches:
        logits = engine(*model_inputs(batch, family, device))
        loss, sums = loss_and_sum_tensor(logits, batch["targets"].to(device), batch["target_bytes"].to(device))
        if poison:  # fault injection (tests)
            loss, sums = loss * float("nan"), sums * torch.tensor([float("nan"), 1.0, 1.0], dtype=sums.dtype, device=device)
        bad = bad | ~torch.isfinite(sums[0])
        total = total + sums
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            nonfinite = bool(all_reduce(bad.to(torch.int64), "max").item())  # the step's one host read
            if nonfinite and plain_optimizer:
                _skip_update(engine)  # DeepSpeed's ZeRO-0 fp32 path has no overflow check
                return total, True, gnorm
            if engine.zero_optimization_stage() == 0 and not nonfinite:  # ZeRO-0 does not track it
                gnorm = _grad_norm(engine)
        engine.step()  # ZeRO-1/2/3 and bf16 see non-finite gradients and skip the update themselves
    if engine.zero_optimization_stage() > 0:
        gnorm = engine.get_global_grad_norm()
        gnorm = float("nan") if gnorm is None else gnorm
    return total, nonfinite, gnorm


def pipeline_step(engine, batches, family) -> tuple:
    """DeepSpeed's pipeline schedule runs all micro-batches and the update in train_batch. The
    loss sums live on the last stage; a non-finite loss is seen after the step (ZeRO-1 skips the
    update itself; the abort after max_nonfinite_steps still applies)."""
    engine.train_batch(data_iter=iter([pipeline_batch(b, family) for b in batches]))
    sums = engine.module.loss_fn.take_sums() if engine.is_last_stage() else LossSums()
    nonfinite = bool(reduce_int(not math.isfinite(sums.nll), "max"))
    gnorm = engine.get_global_grad_norm()
    return sums.as_tensor(), nonfinite, float("nan") if gnorm is None else gnorm


def _grad_norm(engine):
    """Global L2 norm of the (already all-reduced) gradients, for ZeRO-0 (a device scalar)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else float("nan")


def _skip_update(engine) -> None:
    """Ends a step without an update, keeping DeepSpeed's counters as engine.step() would."""
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
