"""BLT <-> transformers' BltForCausalLM (blt_dist/interop/hf_blt.py): a meta-layout BLT with
BOS-alone entropy patching exports with its entropy model as HF's BltPatcher, and HF computes the
same patches and logits from the bytes alone. Random-init tiny models; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from blt_dist.cli import main
from blt_dist.config import Config
from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from blt_dist.data.entropies import document_entropies
from blt_dist.data.patching import PatchingRule
from blt_dist.evaluation.generate import BLTDecoder, Sampling, generate
from blt_dist.interop.hf_blt import hf_threshold
from blt_dist.interop.hf_export import write_hf
from blt_dist.model import build_model
from blt_dist.model.weights import load_export
from blt_dist.training.export import save_export
from blt_dist.vocab import BOS_ID, encode_document

transformers = pytest.importorskip("transformers")

DOCUMENTS = [
    "Zürich → 東京: naïve café, 🙂 emoji.".encode(),
    b"\xff\xfe\x80 invalid \xc3( bytes \x00 NUL",
    b"ab",  # shorter than a patch
    b"The quick brown fox jumps over the lazy dog. " * 2,
]

# (latent dim, heads, kv heads, encoder dim, k, max_patch_length); 2*16 == 32: no encoder projection
SHAPES = [(32, 4, 2, 16, 2, 16), (32, 4, 4, 8, 2, 16), (48, 4, 2, 16, 3, 4)]


def entropy_export(path, seed=0):
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=2, n_heads=4, window=128)
    model = build_model(cfg.model).eval()
    save_export(model.state_dict(), cfg, path)
    return model


def meta_blt(tmp_path, shape, seed=1):
    """A meta-layout BLT run config + model, its entropy model exported under tmp_path, and a
    threshold at the median float16 entropy of DOCUMENTS (patches of about 2 bytes)."""
    dim, heads, kv, enc, k, max_len = shape
    entropy = entropy_export(tmp_path / "entropy")
    cfg = Config()
    cfg.model = ModelConfig(family="blt", dim=dim, n_layers=2, n_heads=heads, n_kv_heads=kv, layout="meta",
                            cross_attn_k=k, rope_theta=500000.0,
                            encoder=LocalModelConfig(dim=enc, n_layers=1, n_heads=2, window=None),
                            decoder=LocalModelConfig(dim=enc, n_layers=2, n_heads=2, window=None),
                            hash=HashEmbeddingConfig(ngram_sizes=[3, 4, 5], buckets=64, functions=2))
    entropies = document_entropies(entropy, DOCUMENTS, 128)
    p = cfg.data.patching
    p.mode, p.bos_alone, p.max_patch_length = "entropy", True, max_len
    p.threshold = float(np.median(np.concatenate(entropies).astype(np.float16)))
    cfg.data.entropy_model = str(tmp_path / "entropy")
    torch.manual_seed(seed)
    return build_model(cfg.model).eval(), cfg, entropy, entropies


def project_patch_lengths(cfg, ids, entropies) -> list[int]:
    """The project's patches of one document, as the loader and eval cut them (float16 entropies)."""
    starts = np.flatnonzero(PatchingRule.from_config(cfg.data.patching).starts(ids, entropies.astype(np.float16)))
    return np.diff(np.append(starts, len(ids))).tolist()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-enc{s[3]}-k{s[4]}-max{s[5]}")
def test_blt_export_computes_the_same_patches_and_logits(tmp_path, shape):
    model, cfg, _, entropies = meta_blt(tmp_path, shape)
    save_export(model.state_dict(), cfg, tmp_path / "export")
    assert main(["export", str(tmp_path / "export"), "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "BltForCausalLM" and hf.model.patcher is not None
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    worst, worst_last, patches = 0.0, 0.0, 0
    for doc, h in zip(DOCUMENTS, entropies):
        ids = encode_document(doc)
        tokens = torch.from_numpy(ids).long()[None]
        lengths = project_patch_lengths(cfg, ids, h)
        assert lengths[0] == 1 and len(lengths) > 1  # BOS alone
        with torch.no_grad():
            _, hf_lengths, _ = hf.model.patcher(tokens, patch_size=hf.config.patch_size,
                                                threshold=hf.config.patching_threshold,
                                                max_patch_length=hf.config.max_patch_length)
            ours = model(tokens, torch.tensor([lengths]), torch.zeros_like(tokens))
            theirs = hf(tokens).logits  # HF patches from the bytes alone
            given = hf(tokens, patch_lengths=torch.tensor([lengths + [0]])).logits
        assert hf_lengths[0].tolist() == lengths, doc
        worst = max(worst, (ours - theirs)[:, :-1].abs().max().item())
        worst_last = max(worst_last, (ours - given).abs().max().item())
        patches += len(lengths)
        if b"\xff" not in doc:
            assert tok(doc.decode()).input_ids == ids[:-1].tolist()
    print(f"max logit difference {worst:.2e} (all but the last position), {worst_last:.2e} (all, patches given); "
          f"{patches} patches")
    assert worst < 1e-4 and worst_last < 1e-4


def test_hf_threshold_cuts_fp32_entropies_where_float16_roundings_cross():
    rng = np.random.default_rng(0)
    for threshold in (1.335442066192627, 2.0, 0.5, 5.109375, 3.14159):
        t = np.float32(hf_threshold(threshold))
        around = np.float32(threshold) + rng.normal(0, 4e-3, 20000).astype(np.float32)
        # every float32 next to the cut too
        edge = np.array([np.nextafter(t, np.float32(-1)), t, np.nextafter(t, np.float32(9))], dtype=np.float32)
        h = np.concatenate([around, edge])
        assert np.array_equal(h > t, h.astype(np.float16) > threshold), threshold


def test_bos_alone_patching_batch_and_incremental_agree():
    ids = np.concatenate([encode_document(d) for d in DOCUMENTS])
    entropies = np.random.default_rng(1).random(ids.shape).astype(np.float16) * 3
    for mode in ("entropy", "monotonic", "space", "static", "byte"):
        plain = PatchingRule(mode, threshold=1.5, threshold_r=0.5, max_patch_length=6)
        alone = PatchingRule(mode, threshold=1.5, threshold_r=0.5, max_patch_length=6, bos_alone=True)
        starts = alone.starts(ids, entropies)
        incremental = alone.incremental()
        assert [incremental.step(t, h) for t, h in zip(ids, entropies)] == starts.tolist(), mode
        after_bos = np.flatnonzero(ids == BOS_ID) + 1
        assert starts[after_bos].all()
        if mode == "entropy":  # by default a low entropy after BOS leaves the first byte in BOS's patch
            low = entropies.copy()
            low[after_bos] = 0
            assert not plain.starts(ids, low)[after_bos].any() and alone.starts(ids, low)[after_bos].all()


def test_greedy_generation_matches_hf_without_cache(tmp_path):
    """HF's BltForCausalLM generates only with use_cache=False in 4.57 (with the cache it raises
    AttributeError: 'BltConfig' object has no attribute 'num_hidden_layers'); it re-patches the
    whole prefix every step. Its last position reads the previous patch when that byte closes one
    (max_patch_length drops the trailing zero-length patch), so equality is not guaranteed in
    general: this checks it on a seed where the argmax is unaffected."""
    model, cfg, entropy, _ = meta_blt(tmp_path, SHAPES[0])
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = "Grüße, 東京 ".encode()
    ours = generate(BLTDecoder(model, cfg, entropy), prompt, 12, Sampling(greedy=True))
    ids = torch.from_numpy(encode_document(prompt)[:-1]).long()[None]
    out = hf.generate(ids, max_new_tokens=len(ours.tokens) - ours.prompt_tokens, do_sample=False, use_cache=False,
                      bad_words_ids=[[0], [1], [3]], eos_token_id=2, pad_token_id=0)
    assert out[0].tolist() == ours.tokens


def test_hf_blt_imports_back_with_equal_weights_and_logits(tmp_path):
    """HF -> project: the export above read back by `import-hf` (BLT + its patcher as an entropy export)."""

    model, cfg, entropy, entropies = meta_blt(tmp_path, SHAPES[1])
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, back_cfg = load_export(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    back_entropy, _ = load_export(back_cfg.data.entropy_model)
    for name, tensor in entropy.state_dict().items():
        assert torch.equal(back_entropy.state_dict()[name], tensor), name
    assert back_cfg.data.patching.bos_alone
    # and the logits: transformers' model from the directory against the imported project model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    worst = 0.0
    for doc, h in zip(DOCUMENTS, entropies):
        ids = encode_document(doc)
        tokens = torch.from_numpy(ids).long()[None]
        lengths = project_patch_lengths(back_cfg, ids, h)
        with torch.no_grad():
            ours = back(tokens, torch.tensor([lengths]), torch.zeros_like(tokens))
            theirs = hf(tokens, patch_lengths=torch.tensor([lengths + [0]])).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"HF -> project BLT: max logit difference {worst:.2e}")
    assert worst < 1e-4
    (tmp_path / "doc.txt").write_bytes(DOCUMENTS[0])
    assert main(["eval", "--model", str(tmp_path / "back"), "--files", str(tmp_path / "doc.txt")]) == 0


def test_bad_blt_directories_are_one_line_and_exit_status_2(tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file

    model, cfg, _, _ = meta_blt(tmp_path, SHAPES[1])
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cases = {
        "missing": (lambda s: s.pop("model.patcher.norm.weight"), "missing tensor model.patcher.norm.weight"),
        "shape": (lambda s: s.update({"model.local_decoder.norm.weight": torch.ones(3)}),
                  "tensor model.local_decoder.norm.weight has shape (3,)"),
        "dtype": (lambda s: s.update({"lm_head.weight": s["lm_head.weight"].to(torch.int64)}), "dtype torch.int64"),
    }
    for name, (change, message) in cases.items():
        path = tmp_path / name
        path.mkdir()
        bad = dict(state)
        change(bad)
        save_file(bad, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
        capsys.readouterr()
        assert main(["import-hf", str(path), "--out", str(tmp_path / f"out-{name}")]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)


def test_a_blt_hf_cannot_express_is_refused_with_the_reason(tmp_path, capsys):
    import json

    model, cfg, _, _ = meta_blt(tmp_path, SHAPES[1])
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["encoder_config"]["cross_attn_all_layers"] = True  # HF then cross-attends after every encoder layer
    config["decoder_config"]["cross_attn_all_layers"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be expressed exactly" in err and "encoder cross-attends after every layer" in err
    assert "decoder cross-attends before its first layer only" in err and err.count("\n") == 1


# Meta's own names (facebookresearch/blt, bytelatent): HF's with these modules renamed
META_NAMES = (("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
              ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
              ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
              ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
              ("embed_tokens", "tok_embeddings"), ("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo"),
              ("q_norm", "cross_attn_norm_q"), ("k_norm", "cross_attn_norm_kv"), ("lm_head", "output"))


def write_meta_dir(hf_dir, out, cfg, safetensors: bool):
    """The HF export of `cfg`'s BLT rewritten in Meta's checkpoint layout (names, one table per
    hash function and n, args and patcher args as Meta's configs hold them)."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    m = cfg.model
    hf = load_file(str(hf_dir / "model.safetensors"))
    main_state, entropy_state = {}, {}
    for name, tensor in hf.items():
        name = "local_decoder.lm_head.weight" if name == "lm_head.weight" else name.removeprefix("model.")
        if name == "encoder_hash_tok_embedding.weight":
            for i, table in enumerate(tensor.split(m.hash.buckets)):
                main_state[f"encoder_hash_tok_embedding.{i}.weight"] = table.clone()
            continue
        for theirs, meta in META_NAMES:
            name = re.sub(rf"\.{re.escape(theirs)}\.", f".{meta}.", name)
        if name.startswith("patcher."):
            entropy_state[name.removeprefix("patcher.")] = tensor.clone()
        else:
            main_state[name] = tensor.clone()
    out.mkdir()
    (out / "entropy_model").mkdir()
    if safetensors:
        save_file(main_state, str(out / "model.safetensors"))
    else:
        torch.save({"model": main_state}, out / "consolidated.pth")
    torch.save(entropy_state, out / "entropy_model" / "consolidated.pth")
    args = dict(dim_global=m.dim, n_layers_global=m.n_layers, n_heads_global=m.n_heads, n_kv_heads_global=m.n_kv_heads,
                dim_local_encoder=m.encoder.dim, n_layers_local_encoder=m.encoder.n_layers,
                n_heads_local_encoder=m.encoder.n_heads, dim_local_decoder=m.decoder.dim,
                n_layers_local_decoder=m.decoder.n_layers, n_heads_local_decoder=m.decoder.n_heads,
                cross_attn_k=m.cross_attn_k, norm_eps=m.norm_eps, rope_theta=m.rope_theta, multiple_of=m.ffn_multiple_of,
                encoder_hash_byte_group_size=list(m.hash.ngram_sizes), encoder_hash_byte_group_vocab=m.hash.buckets,
                encoder_hash_byte_group_nb_functions=m.hash.functions, vocab_size=260, max_seqlen=1024,
                cross_attn_all_layers_encoder=False, cross_attn_all_layers_decoder=True, local_attention_window_len=512)
    (out / ("config.json" if safetensors else "params.json")).write_text(
        json.dumps({"args": args} if safetensors else {"model": args}))
    patcher = {"threshold": cfg.data.patching.threshold, "max_patch_length": cfg.data.patching.max_patch_length}
    (out / "entropy_model" / "params.json").write_text(json.dumps(
        {"entropy_model": {"dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 64, "max_seqlen": 128},
         "data": {"patcher_args": patcher}}))


@pytest.mark.parametrize("shape, safetensors", [(SHAPES[0], True), (SHAPES[1], False)],
                         ids=["no-projection-safetensors", "projection-consolidated.pth"])
def test_a_blt_in_metas_layout_imports_with_equal_weights(tmp_path, capsys, shape, safetensors):
    model, cfg, entropy, _ = meta_blt(tmp_path, shape)
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    write_meta_dir(tmp_path / "hf", tmp_path / "meta", cfg, safetensors)
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "meta"), "--out", str(tmp_path / "back")]) == 0
    assert "attend within 512 bytes" in capsys.readouterr().err  # Meta's local window, reported
    back, back_cfg = load_export(tmp_path / "back")
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    back_entropy, _ = load_export(back_cfg.data.entropy_model)
    for name, tensor in entropy.state_dict().items():
        assert torch.equal(back_entropy.state_dict()[name], tensor), name
    assert back_cfg.data.patching.threshold == pytest.approx(cfg.data.patching.threshold)
    assert back_cfg.data.patching.max_patch_length == cfg.data.patching.max_patch_length

    (tmp_path / "meta" / "entropy_model" / "consolidated.pth").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "meta"), "--out", str(tmp_path / "bad")]) == 2
    assert "unreadable torch checkpoint" in capsys.readouterr().err
