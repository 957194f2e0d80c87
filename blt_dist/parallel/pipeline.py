"""Pipeline parallelism: the plain models as DeepSpeed PipelineModules (ZeRO <= 1).

    pipe = build_pipeline(cfg.model, num_stages=2, activation_checkpointing=False, seed=cfg.run.seed,
                          sample_shape=SampleShape.from_data(cfg.data))
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=optimizer_groups(pipe, wd), config=ds)
    loss = engine.train_batch(iter([pipeline_batch(b, family) for b in micro_batches]))
    state = consolidate_pipeline_checkpoint(Path(ckpt_dir) / tag)   # plain names, fp32

A pipeline is a straight line of layers passing one tuple of tensors. The layers are the plain
model's own modules (model/transformer.py, model/blt.py), wrapped so that each reads and
writes the tuple:

    LM (entropy, bpe):  (tokens, doc_ids)
        LMEmbeddingLayer -> (h, doc_ids) -> LMBlockLayer x L -> (h, doc_ids) -> LMHeadLayer -> logits
    BLT:                (tokens, patch_lengths, doc_ids)
        BLTEncoderLayer  -> (patch_states, byte_states, patch_lengths, doc_ids)
        LatentBlockLayer x L: transforms patch_states, passes the rest through
        BLTDecoderLayer  -> logits

Floating tensors (h, patch_states, byte_states) carry gradients; the integer layout tensors
travel alongside and every layer rebuilds its attention kernel (model/attention.py) and
rotary tables from them (a few comparisons per layer, cheaper than sending masks between
stages). byte_states
crosses every latent stage untouched so that the decoder can start from it, and its gradient
travels back the same way. DeepSpeed 0.19 handles two grad-carrying tensors per tuple when the
shapes are static, the dtypes are floating and every floating tensor receives a gradient
(`_exec_send_grads` sends one gradient per floating tensor and asserts it exists; integer
tensors are skipped), and only without its tensor-parallel "pipe/grad partitioning" (which
assumes one grad-carrying tensor, first in the tuple; it is off when there is no tensor
parallelism, as here). tests/test_pipeline.py runs 2 stages (encoder + latent | latent +
decoder) and 3 stages (with a middle stage of latent blocks only, under activation
checkpointing) against the plain model: same losses every step, same weights after.

Names. Each layer registers its modules under their path in the plain model (LatentBlockLayer
holds `latent.{i}`, BLTDecoderLayer holds `decoder`), so a layer's state dict (what DeepSpeed
writes to `layer_XX-model_states.pt`) already uses plain-model names, and a PipelineModule
state dict is the plain one with the layer index in front: `to_model_state_dict` strips it.

Weights. `build_pipeline` builds the plain model (`build_model` under `torch.manual_seed(seed)`)
and hands its modules to the stages, so the pipeline starts from exactly the weights of the
non-pipelined run. Each rank keeps only its own stage's layers; the full model exists once
on the host while the pipeline is built (fp32: 4 bytes per parameter).

Activation checkpointing uses DeepSpeed's own (activation_checkpoint_interval=1) on the
block, head and decoder layers, so parameter names stay the plain ones (torch's
checkpoint_wrapper, as engine.apply_activation_checkpointing uses, would rename them).

Stage balance. DeepSpeed partitions by parameters, layer count or layer type; none fits BLT
(the local models are small in parameters but run per byte, the hash embeddings are huge in
parameters and cost nothing). `shims.pipeline_module_class` overrides `_partition_layers` to
cut where the per-layer forward FLOPs of blt_dist/flops.py balance (minimising the busiest
stage); it sets `self.parts` and the local bounds exactly as DeepSpeed's own methods do.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from blt_dist import shims
from blt_dist.flops import SampleShape, blt_forward_flops, lm_forward_flops
from blt_dist.model import BLT, CausalLM, ModelConfig, build_model, patch_layout
from blt_dist.model.blt import latent_mask_and_rope
from blt_dist.model.loss import LossSums, loss_and_sum_tensor, token_nll
from blt_dist.model.transformer import lm_mask_and_rope

__all__ = [
    "PipelineLoss", "build_pipeline", "pipeline_batch", "layer_flops", "balanced_boundaries",
    "to_model_state_dict", "from_model_state_dict", "consolidate_pipeline_checkpoint", "sequential_twin",
]

# Layers worth recomputing in backward. The embedding/encoder layers are left out: their
# inputs are integer tensors only, and DeepSpeed's (reentrant) checkpoint would detach them
# from autograd ("element 0 of tensors does not require grad", FIELD-NOTES).
CHECKPOINTABLE_LAYERS = ["LMBlockLayer", "LMHeadLayer", "LatentBlockLayer", "BLTDecoderLayer"]


# ---------------------------------------------------------------------------------------------
# Layers: the plain model's modules, registered under their plain-model paths


class LMEmbeddingLayer(nn.Module):
    def __init__(self, model: CausalLM):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, inputs: tuple) -> tuple:
        tokens, doc_ids = inputs
        return self.tok_embeddings(tokens), doc_ids


class LMBlockLayer(nn.Module):
    def __init__(self, model: CausalLM, index: int):
        super().__init__()
        self.cfg, self.key = model.cfg, str(index)
        self.blocks = nn.ModuleDict({self.key: model.blocks[index]})  # state dict: blocks.{index}.*

    def forward(self, inputs: tuple) -> tuple:
        h, doc_ids = inputs
        attention, rope = lm_mask_and_rope(self.cfg, h.shape[1], doc_ids, h.device)
        return self.blocks[self.key](h, attention, rope), doc_ids


class LMHeadLayer(nn.Module):
    def __init__(self, model: CausalLM):
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, inputs: tuple) -> torch.Tensor:
        h, _ = inputs
        return self.output(self.norm(h))


class BLTEncoderLayer(nn.Module):
    def __init__(self, model: BLT):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, inputs: tuple) -> tuple:
        tokens, patch_lengths, doc_ids = inputs
        patch_states, byte_states = self.encoder(tokens, doc_ids, patch_layout(patch_lengths, doc_ids))
        return patch_states, byte_states, patch_lengths, doc_ids


class LatentBlockLayer(nn.Module):
    def __init__(self, model: BLT, index: int):
        super().__init__()
        self.cfg, self.key = model.cfg, str(index)
        self.latent = nn.ModuleDict({self.key: model.latent[index]})  # state dict: latent.{index}.*

    def forward(self, inputs: tuple) -> tuple:
        patch_states, byte_states, patch_lengths, doc_ids = inputs
        attention, rope = latent_mask_and_rope(self.cfg, patch_lengths, doc_ids)
        return self.latent[self.key](patch_states, attention, rope), byte_states, patch_lengths, doc_ids


class BLTDecoderLayer(nn.Module):
    def __init__(self, model: BLT):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, inputs: tuple) -> torch.Tensor:
        patch_states, byte_states, patch_lengths, doc_ids = inputs
        return self.decoder(patch_states, byte_states, doc_ids, patch_layout(patch_lengths, doc_ids))


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    """The plain model cut into pipeline layers (sharing its parameters)."""
    if isinstance(model, BLT):
        return [BLTEncoderLayer(model), *(LatentBlockLayer(model, i) for i in range(len(model.latent))),
                BLTDecoderLayer(model)]
    return [LMEmbeddingLayer(model), *(LMBlockLayer(model, i) for i in range(len(model.blocks))), LMHeadLayer(model)]


def pipeline_batch(batch: dict, family: str) -> tuple[tuple, tuple]:
    """(inputs, labels) of one micro-batch, as DeepSpeed's train_batch data iterator yields them.

    The first stage reads the inputs, the last stage the labels; both stages of a pipeline
    must therefore see the same batches (the loader is indexed by the data-parallel rank)."""
    labels = (batch["targets"], batch["target_bytes"])
    if family == "blt":
        return (batch["tokens"], batch["patch_lengths"], batch["doc_ids"]), labels
    return (batch["tokens"], batch["doc_ids"]), labels


class PipelineLoss:
    """The last stage's loss_fn: the mean NLL over predicted targets (blt_dist.model.loss), and the
    summed LossSums of the micro-batches since the last `take_sums()` for bits-per-byte logging
    (DeepSpeed's train_batch returns only the mean loss)."""

    __name__ = "PipelineLoss"  # DeepSpeed prints loss_fn.__name__

    def __init__(self):
        self.sums: Optional[torch.Tensor] = None  # [nll, targets, bytes] on the device, read by take_sums
        self.keep_token_nll = False  # validation: keep the per-token NLL of the next call
        self.token_nll: Optional[torch.Tensor] = None

    def __call__(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        targets, target_bytes = labels
        loss, sums = loss_and_sum_tensor(logits, targets, target_bytes)
        self.sums = sums if self.sums is None else self.sums + sums
        if self.keep_token_nll:
            self.token_nll = token_nll(logits, targets).detach()
        return loss

    def take_token_nll(self) -> Optional[torch.Tensor]:
        """The kept per-token NLL (validation); its sums are dropped, not added to training's."""
        nll, self.token_nll = self.token_nll, None
        self.take_sums()
        return nll

    def take_sums(self) -> LossSums:
        """The sums since the last call (read on the host: the pipeline step's one read)."""
        sums, self.sums = self.sums, None
        return LossSums() if sums is None else LossSums.from_tensor(sums.cpu())


# ---------------------------------------------------------------------------------------------
# Stage balance by FLOPs


def layer_flops(model_cfg: ModelConfig, shape: SampleShape) -> list[float]:
    """Forward FLOPs of one sample per pipeline layer, in `pipeline_layers` order (real-context
    accounting of blt_dist/flops.py; lookups count 0)."""
    if model_cfg.family == "blt":
        flops, _ = blt_forward_flops(model_cfg, shape)
        encoder = flops["encoder"] + flops["encoder_cross_attention"]
        decoder = flops["decoder_cross_attention"] + flops["decoder"] + flops["head"]
        return [encoder, *[flops["global"] / model_cfg.n_layers] * model_cfg.n_layers, decoder]
    tokens = shape.tokens_per_sample if model_cfg.family == "bpe" else shape.seq_len
    flops = lm_forward_flops(model_cfg, tokens)
    return [0.0, *[flops["transformer"] / model_cfg.n_layers] * model_cfg.n_layers, flops["head"]]


def balanced_boundaries(weights: Sequence[float], num_stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., n] (stage s runs layers b_s .. b_{s+1}-1, none empty) that
    minimise the heaviest stage: the pipeline runs at the pace of its slowest stage.

    (DeepSpeed's partition_balanced minimises max - min instead, which can leave the heaviest
    stage heavier than necessary.) Dynamic programme, O(stages x layers^2); ties go to the
    earliest cut, so later stages (which also hold the loss) get the lighter share."""
    n = len(weights)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[s][i]: the smallest possible heaviest stage when the first i layers form s stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                heaviest = max(best[s - 1][j], prefix[i] - prefix[j])
                if heaviest < best[s][i]:
                    best[s][i], cut[s][i] = heaviest, j
    bounds = [n]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def build_pipeline(model_cfg: ModelConfig, num_stages: int, activation_checkpointing: bool, seed: int,
                   sample_shape: Optional[SampleShape] = None):
    """The PipelineModule for `model_cfg`, with the weights of `torch.manual_seed(seed); build_model(model_cfg)`.

    Needs the process group (engine.init_distributed). `sample_shape` (SampleShape.from_data(
    cfg.data)) sets the FLOP balance; the defaults of SampleShape are used without it."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    layers = pipeline_layers(model)
    weights = layer_flops(model_cfg, sample_shape or SampleShape())
    module_class = shims.pipeline_module_class()
    module_class.pending_boundaries = balanced_boundaries(weights, num_stages)
    try:
        pipe = module_class(
            layers=layers,
            num_stages=num_stages,
            loss_fn=PipelineLoss(),
            partition_method="flops",
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            checkpointable_layers=list(CHECKPOINTABLE_LAYERS),
        )
    finally:
        module_class.pending_boundaries = None
    # PipelineModule keeps every layer it was given in `_layer_specs`; drop the other stages'
    # layers so the rest of the plain model can be freed (only the partitioning reads the list).
    pipe._layer_specs = [layer if pipe._local_start <= i < pipe._local_stop else None
                         for i, layer in enumerate(pipe._layer_specs)]
    # Only the PipelineEngine precomputes which layer groups to checkpoint; without this a bare
    # PipelineModule with checkpointing on zips against an empty list and returns its inputs.
    pipe._precompute_checkpointable_values()
    pipe.family = model_cfg.family
    pipe.layer_flops = weights
    return pipe


# ---------------------------------------------------------------------------------------------
# Names and checkpoints

_LAYER_PREFIX = re.compile(r"^(\d+)\.(.+)$")


def to_model_state_dict(pipeline_state: dict) -> dict:
    """PipelineModule state dict ('{layer}.{plain name}') -> the plain model's state dict."""
    out = {}
    for key, value in pipeline_state.items():
        match = _LAYER_PREFIX.match(key)
        if match is None:
            raise KeyError(f"{key!r} is not a pipeline layer parameter ('<layer>.<name>')")
        name = match.group(2)
        if name in out:
            raise KeyError(f"{name!r} appears in two pipeline layers")
        out[name] = value
    return out


def from_model_state_dict(model_state: dict, pipeline_module: nn.Module) -> dict:
    """The plain model's state dict -> this rank's PipelineModule state dict (its own layers only)."""
    out = {}
    for key in pipeline_module.state_dict():
        out[key] = model_state[_LAYER_PREFIX.match(key).group(2)]
    return out


def consolidate_pipeline_checkpoint(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """One plain-model fp32 state dict from a pipeline checkpoint's `layer_XX-model_states.pt`.

    These files hold the module weights in the training dtype: with bf16 they are the bf16
    copies, not the fp32 master weights of the optimizer state. Loads with
    `build_model(cfg).load_state_dict(state)` and writes with `blt_dist.training.export.save_export`."""
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("layer_*-model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no layer_*-model_states.pt (not a pipeline checkpoint tag?)")
    by_layer: dict[str, Path] = {}
    for path in files:
        layer = path.name.split("-", 1)[0]
        if layer in by_layer:  # tensor-parallel slices: not produced by this package
            raise ValueError(f"{tag_dir}: several files for {layer} ({by_layer[layer].name}, {path.name})")
        by_layer[layer] = path
    state: dict[str, torch.Tensor] = {}
    for layer, path in by_layer.items():
        for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            if name in state:
                raise KeyError(f"{tag_dir}: {name!r} appears in two layer files")
            state[name] = tensor.to(torch.float32)
    return state


# ---------------------------------------------------------------------------------------------
# The sequential twin


class SequentialTwin(nn.Module):
    """The pipeline's layers run in order in one process (GPT-NeoX's to_sequential): the same
    modules, so the twin and the pipeline share parameters."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: tuple) -> torch.Tensor:
        x = inputs
        for layer in self.layers:
            x = layer(x)
        return x


def sequential_twin(pipeline_module) -> SequentialTwin:
    """A plain module over all of a one-stage pipeline's layers (a multi-stage rank holds only its own)."""
    funcs = pipeline_module.forward_funcs
    if pipeline_module._local_start != 0 or len(funcs) != pipeline_module._num_layers:
        raise ValueError(f"this rank holds layers {pipeline_module._local_start}..{pipeline_module._local_stop - 1} "
                         f"of {pipeline_module._num_layers}; build the pipeline with num_stages=1 for a twin")
    return SequentialTwin(funcs)
