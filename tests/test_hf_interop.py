"""Hugging Face interop (blt_dist/interop): project exports <-> transformers, checked by logits.

Random-init models only, tiny shapes; nothing is downloaded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blt_dist.cli import main
from blt_dist.config import Config
from blt_dist.config.model import ModelConfig
from blt_dist.evaluation.generate import ByteLMDecoder, Sampling, TokenLMDecoder, generate
from blt_dist.interop import InteropError
from blt_dist.interop.hf_export import (
    BLT_DIFFERENCES,
    BOS_ALONE_DIFFERENCE,
    HASH_DIFFERENCE,
    LATENT_NORM_DIFFERENCE,
    write_hf,
)
from blt_dist.interop.hf_import import convert
from blt_dist.model import build_model
from blt_dist.model.weights import load_export
from blt_dist.training.export import save_export
from blt_dist.vocab import encode_document
from tests.conftest import sentencepiece_bpe

transformers = pytest.importorskip("transformers")

# Real bytes: multi-byte UTF-8, invalid UTF-8, and a document shorter than a patch.
DOCUMENTS = [
    "Zürich → 東京: naïve café, 🙂 emoji.".encode(),
    b"\xff\xfe\x80 invalid \xc3( bytes \x00 NUL",
    b"ab",
    b"The quick brown fox jumps over the lazy dog. " * 3,
]

# (family, vocab, dim, layers, heads, kv heads, rope theta)
SHAPES = [
    ("byte", 260, 32, 2, 4, None, 10000.0),
    ("byte", 260, 48, 1, 6, 2, 500000.0),  # grouped-query attention: k permuted with kv heads
    ("bpe", 300, 32, 2, 2, 1, 10000.0),
]


def project_model(family, vocab, dim, layers, heads, kv, theta, seed=0):
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = ModelConfig(family=family, vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                            n_kv_heads=kv, rope_theta=theta, ffn_multiplier=1.3)
    return build_model(cfg.model).eval(), cfg


def token_rows(vocab):
    """Each document as ids; bpe rows are random ids below the vocabulary (the logits test is
    about the model, not the tokenizer)."""
    g = torch.Generator().manual_seed(1)
    for doc in DOCUMENTS:
        ids = torch.from_numpy(encode_document(doc))
        yield ids if vocab == 260 else torch.randint(4, vocab, ids.shape, generator=g)


def max_logit_difference(ours, theirs, vocab) -> float:
    worst = 0.0
    with torch.no_grad():
        for ids in token_rows(vocab):
            a = ours(ids[None])
            b = theirs(ids[None]).logits
            worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-d{s[2]}-h{s[4]}-kv{s[5]}")
def test_export_to_llama_matches_logits_and_imports_back(tmp_path, shape):
    model, cfg = project_model(*shape)
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    worst = max_logit_difference(model, hf, shape[1])
    print(f"{shape}: max logit difference project -> HF {worst:.2e}")  # -s shows it (the closing notes' numbers)
    assert worst < 1e-4

    state, imported_cfg = convert(tmp_path / "hf")
    save_export(state, imported_cfg, tmp_path / "back")
    back, _ = load_export(tmp_path / "back")
    assert imported_cfg.model.ffn_hidden(shape[2]) == cfg.model.ffn_hidden(shape[2])
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_hf_model_imports_with_equal_logits(tmp_path):
    """HF -> project: a random-init LlamaForCausalLM saved by transformers itself."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=20000.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "export")]) == 0
    ours, cfg = load_export(tmp_path / "export")
    assert cfg.model.family == "byte" and cfg.model.norm_eps == 1e-6
    worst = max_logit_difference(ours, hf, 260)
    print(f"HF Llama -> project: max logit difference {worst:.2e}")
    assert worst < 1e-4
    # The import is an export the project's commands read.
    (tmp_path / "doc.txt").write_bytes(DOCUMENTS[0])
    assert main(["eval", "--model", str(tmp_path / "export"), "--files", str(tmp_path / "doc.txt")]) == 0
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt", "ab", "--greedy",
                 "--max-bytes", "4"]) == 0


def test_greedy_generation_from_the_export_equals_the_project(tmp_path):
    model, cfg = project_model("byte", 260, 32, 2, 4, 2, 10000.0, seed=5)
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "Grüße, 東京 🙂 ".encode()
    ours = generate(ByteLMDecoder(model), prompt, 24, Sampling(greedy=True))
    ids = torch.from_numpy(encode_document(prompt)[:-1])[None]
    assert tok(prompt.decode(), return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert tok.decode(ids[0, 1:]) == prompt.decode()
    # The project never picks PAD, BOS or the reserved id; ban them in HF too.
    out = hf.generate(ids, max_new_tokens=len(ours.tokens) - ours.prompt_tokens, do_sample=False,
                      bad_words_ids=[[0], [1], [3]], eos_token_id=2, pad_token_id=0)
    assert out[0].tolist() == ours.tokens


def test_bpe_export_carries_a_tokenizer_transformers_loads(tmp_path):
    pytest.importorskip("sentencepiece")
    model, cfg = project_model("bpe", 300, 32, 2, 4, None, 10000.0, seed=6)
    cfg.data.tokenizer = str(sentencepiece_bpe(tmp_path))
    write_hf(model.state_dict(), cfg, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    decoder = TokenLMDecoder(model, cfg.data.tokenizer)
    sentence = b"the dog sat on the cat"
    assert tok(sentence.decode())["input_ids"] == decoder.encode_prompt(sentence)
    ours = generate(decoder, sentence, 20, Sampling(greedy=True))
    out = hf.generate(torch.tensor([decoder.encode_prompt(sentence)]), do_sample=False, eos_token_id=2,
                      pad_token_id=0, max_new_tokens=len(ours.tokens) - ours.prompt_tokens,
                      bad_words_ids=[[t] for t in decoder.banned])
    assert out[0].tolist() == ours.tokens


@pytest.mark.parametrize("family", ["blt", "entropy"])
def test_refused_export_names_each_difference(tmp_path, family):
    cfg = Config()
    cfg.model = ModelConfig(family=family, dim=32, n_layers=1, n_heads=2)
    cfg.model.encoder.dim = cfg.model.decoder.dim = 16  # 2 * 16 == 32: HF would drop the projection
    with pytest.raises(InteropError) as err:
        write_hf({}, cfg, tmp_path / "hf")
    if family == "blt":
        for difference in BLT_DIFFERENCES:
            assert difference in str(err.value)
    else:
        assert "sliding window 512" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_a_meta_layout_blt_is_refused_only_for_what_remains():
    cfg = Config()
    cfg.model = ModelConfig(family="blt", dim=32, n_layers=1, n_heads=2, layout="meta")
    cfg.model.encoder.window = None
    cfg.data.patching.mode = "space"
    with pytest.raises(InteropError) as err:
        write_hf({}, cfg, "unused")
    message = str(err.value)
    assert HASH_DIFFERENCE not in message and LATENT_NORM_DIFFERENCE not in message
    assert "encoder window" not in message and "decoder window 512" in message
    assert BOS_ALONE_DIFFERENCE in message and "patching mode 'space'" in message


def bad_dirs(tmp_path):
    model, cfg = project_model("byte", 260, 32, 1, 4, None, 10000.0)
    good = tmp_path / "good"
    write_hf(model.state_dict(), cfg, good)
    state = load_file(str(good / "model.safetensors"))
    config = json.loads((good / "config.json").read_text())

    def variant(name, config_change=None, state_change=None):
        path = tmp_path / name
        path.mkdir()
        c, s = dict(config), dict(state)
        (config_change or (lambda c: None))(c)
        (state_change or (lambda s: None))(s)
        (path / "config.json").write_text(json.dumps(c))
        save_file(s, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    (tmp_path / "empty").mkdir()
    return {
        "not an HF dir": (tmp_path / "empty", "not a Hugging Face model directory"),
        "unknown architecture": (variant("arch", lambda c: c.update(architectures=["GPT2LMHeadModel"])),
                                 "architecture 'GPT2LMHeadModel' is not importable"),
        "mismatched shape": (variant("shape", state_change=lambda s: s.update(
            {"model.norm.weight": torch.ones(31)})), "model.norm.weight"),
        "missing tensor": (variant("missing", state_change=lambda s: s.pop("lm_head.weight")),
                           "missing tensor lm_head.weight"),
        "wrong dtype": (variant("dtype", state_change=lambda s: s.update(
            {"model.norm.weight": torch.ones(32, dtype=torch.int32)})), "dtype torch.int32"),
    }


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    for case, (path, message) in bad_dirs(tmp_path).items():
        assert main(["import-hf", str(path), "--out", str(tmp_path / "out")]) == 2, case
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (case, err)


def test_export_command_writes_hf_from_an_export_and_refuses_a_blt(tmp_path, capsys):
    model, cfg = project_model("byte", 260, 32, 1, 4, None, 10000.0)
    save_export(model.state_dict(), cfg, tmp_path / "export")
    assert main(["export", str(tmp_path / "export"), "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_logit_difference(model, hf, 260) < 1e-4

    blt = Config()
    blt.model = ModelConfig(family="blt", dim=32, n_layers=1, n_heads=2)
    blt.model.encoder.dim = blt.model.decoder.dim = 16
    blt.model.hash.buckets = 16
    save_export(build_model(blt.model).state_dict(), blt, tmp_path / "blt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "blt"), "--hf", str(tmp_path / "blt-hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(difference in err for difference in BLT_DIFFERENCES)
    assert "no entropy model" in err
    assert not (tmp_path / "blt-hf").exists()


def test_byte_tokenizer_table_is_gpt2s():
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from blt_dist.interop.hf_export import gpt2_byte_chars

    assert gpt2_byte_chars() == bytes_to_unicode()


@pytest.mark.parametrize("encoder_dim", [16, 8], ids=["k*enc==dim", "with-projection"])
def test_meta_layout_blt_equals_hf_blt_given_the_patches(encoder_dim):
    """The meta layout computes what BltForCausalLM computes, for patch lengths with BOS alone and
    a trailing empty patch (what HF's patcher produces); no windows (HF has none)."""
    from transformers.models.blt.configuration_blt import BltConfig

    from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig
    from blt_dist.interop.hf_blt import hf_blt_config_kwargs, to_hf_blt_state

    m = ModelConfig(family="blt", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, layout="meta", cross_attn_k=2,
                    rope_theta=500000.0, encoder=LocalModelConfig(dim=encoder_dim, n_layers=1, n_heads=2, window=None),
                    decoder=LocalModelConfig(dim=encoder_dim, n_layers=2, n_heads=2, window=None),
                    hash=HashEmbeddingConfig(ngram_sizes=[3, 4, 5], buckets=64, functions=2))
    torch.manual_seed(0)
    ours = build_model(m).eval()
    kwargs = hf_blt_config_kwargs(m)
    kwargs["patcher_config"] = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    hf = transformers.BltForCausalLM(BltConfig(**kwargs)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_blt_state(ours.state_dict(), m), strict=False)
    assert not unexpected and all(name.startswith("model.patcher.") for name in missing)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for ids in token_rows(260):
        lengths = [1]  # BOS alone
        while sum(lengths) < ids.numel():
            lengths.append(min(int(torch.randint(1, 5, (1,), generator=g)), ids.numel() - sum(lengths)))
        patch_lengths = torch.tensor([lengths + [0]])
        with torch.no_grad():
            a = ours(ids[None], patch_lengths, torch.zeros_like(ids[None]))
            b = hf(ids[None], patch_lengths=patch_lengths).logits
        worst = max(worst, (a - b).abs().max().item())
    print(f"meta-layout BLT vs HF, patches given: max logit difference {worst:.2e}")
    assert worst < 1e-4
