"""The BLT layout HF/Meta can express (`model.layout=meta` and its single switches): the hash
bit for bit against transformers' own function, the modules it drops, FLOPs, cached steps."""
from __future__ import annotations

import pytest
import torch

from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from blt_dist.flops import SampleShape, forward_flops_per_byte, params_by_component
from blt_dist.model import build_model
from blt_dist.model.blt import patch_layout
from blt_dist.model.hash_embeddings import meta_ngram_hashes
from blt_dist.vocab import encode_document

modeling_blt = pytest.importorskip("transformers.models.blt.modeling_blt")

TEXT = "Zürich → 東京 🙂 ".encode() + b"\xff\xfe\x80 bytes"


def test_meta_hash_is_transformers_hash_bit_for_bit():
    tokens = torch.from_numpy(encode_document(TEXT * 3))[None]
    sizes, functions, buckets = [3, 4, 5, 6, 7, 8], 3, 30011
    ours = meta_ngram_hashes(tokens, torch.zeros_like(tokens), sizes, functions, buckets)
    index = 0
    for f in range(functions):
        prime = [1000000007, 5915587277, 1500450271][f]
        for n in sizes:
            theirs = modeling_blt.byte_group_hash_function(tokens, n, prime, buckets)
            assert torch.equal(ours[index], theirs), (f, n)
            index += 1


def blt_config(layout: str, encoder_dim: int, **switches) -> ModelConfig:
    return ModelConfig(family="blt", dim=32, n_layers=2, n_heads=4, layout=layout, cross_attn_k=2,
                       encoder=LocalModelConfig(dim=encoder_dim, n_layers=1, n_heads=2, window=8),
                       decoder=LocalModelConfig(dim=encoder_dim, n_layers=2, n_heads=2, window=8),
                       hash=HashEmbeddingConfig(ngram_sizes=[3, 4], buckets=64, functions=2 if layout == "meta" else 1),
                       **switches)


def test_meta_layout_drops_what_hf_has_not():
    names = set(build_model(blt_config("meta", 16)).state_dict())
    assert "encoder.patch_proj.weight" not in names  # 2 * 16 == 32: no projection
    assert not any(name.startswith("decoder.latent_norm") for name in names)
    assert len([n for n in names if n.startswith("encoder.hash_embeddings.tables.")]) == 4  # 2 functions x 2 sizes
    kept = set(build_model(blt_config("meta", 8)).state_dict())  # 2 * 8 != 32: the projection stays
    assert "encoder.patch_proj.weight" in kept
    switched = set(build_model(blt_config("project", 16, latent_norm=False)).state_dict())
    assert "encoder.patch_proj.weight" in switched and "decoder.latent_norm.weight" not in switched


def test_meta_flops_lose_exactly_the_encoder_projection():
    shape = SampleShape(seq_len=64, tokens_per_sample=16, patches_per_sample=16, byte_capacity=64, patch_size=4.0,
                        bytes_per_token=4.0)
    meta, project = (forward_flops_per_byte(blt_config(layout, 16), shape) for layout in ("meta", "project"))
    assert meta["encoder_cross_attention"] < project["encoder_cross_attention"]
    assert {k: v for k, v in meta.items() if k != "encoder_cross_attention"} == \
           {k: v for k, v in project.items() if k != "encoder_cross_attention"}
    assert params_by_component(blt_config("meta", 16))["encoder_cross_attention"] < \
           params_by_component(blt_config("project", 16))["encoder_cross_attention"]


@pytest.mark.parametrize("encoder_dim", [16, 8])
def test_meta_cached_steps_equal_the_full_forward(encoder_dim):
    torch.manual_seed(0)
    model = build_model(blt_config("meta", encoder_dim)).eval()
    tokens = torch.from_numpy(encode_document(TEXT))[None]
    lengths = [1, 3, 2, 5, 4]  # BOS alone in the first patch, as HF/Meta patch
    lengths.append(tokens.shape[1] - sum(lengths))
    patch_lengths = torch.tensor([lengths])
    doc_ids = torch.zeros_like(tokens)
    with torch.no_grad():
        full = model(tokens, patch_lengths, doc_ids)[0]
        layout = patch_layout(patch_lengths, doc_ids)
        ends = set((patch_lengths.cumsum(-1) - 1)[0].tolist())
        cache = model.new_cache()
        stepped = torch.cat([model.step(int(t), i in ends, cache)[0] for i, t in enumerate(tokens[0])])
    assert layout.num_patches == len(lengths)
    assert (stepped - full).abs().max().item() < 1e-5


def test_switches_that_cannot_hold_are_config_errors():
    problems = dict(blt_config("meta", 8, encoder_projection=False).validate())
    assert "cross_attn_k * encoder.dim = 16 != dim = 32" in problems["model.encoder_projection"]
    project = blt_config("project", 16)
    project.hash.functions = 2
    assert "model.hash.functions" in dict(project.validate())
    assert "model.layout" in dict(blt_config("llama", 16).validate())
