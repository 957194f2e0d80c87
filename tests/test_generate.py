"""`blt-dist generate`: cached generation gives the logits of a full forward pass (fp32).

For every family (a tiny random BLT with entropy patching and with space patching, a byte LM,
a BPE LM), the logits each cached step produced are compared with one forward pass over the
whole generated sequence, the BLT's given the patch lengths the online patcher chose. The
windows (entropy model, encoder, decoder, latent) are shorter than the sequences, so the
sliding caches are exercised. Plus: sampling (seeded, top-k, top-p), EOS, raw-byte prompts,
and the entropy-model checks.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from blt_dist.cli import main
from blt_dist.config import Config
from blt_dist.config.model import HashEmbeddingConfig, LocalModelConfig, ModelConfig
from blt_dist.data.entropies import document_entropies, receptive_field
from blt_dist.data.patching import PatchingRule, patch_lengths_from_starts, patch_starts
from blt_dist.evaluation.generate import (
    PREFILL_CHUNK,
    BLTDecoder,
    ByteLMDecoder,
    Sampling,
    TokenLMDecoder,
    generate,
    load_decoder,
    next_token_probs,
    printable,
)
from blt_dist.model import build_model
from blt_dist.model.weights import export_info
from blt_dist.training.export import save_export
from blt_dist.vocab import BOS_ID, EOS_ID, OFFSET
from tests.conftest import sentencepiece_bpe

PROMPT = b"the cat sat on the mat. "
GREEDY = Sampling(greedy=True)
SAMPLED = Sampling(temperature=1.0, top_k=40, seed=3)
ATOL = 1e-5


def entropy_model(seed: int = 0, window: int = 8):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(family="entropy", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, window=window))
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # spread a random model's entropies so a threshold separates them
    return model.eval()


def blt_config(mode: str, threshold=None, latent_window=None) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        family="blt", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, window=latent_window, attention="dense",
        encoder=LocalModelConfig(dim=16, n_layers=1, n_heads=2, window=6),
        decoder=LocalModelConfig(dim=16, n_layers=2, n_heads=2, window=5),
        cross_attn_k=2, hash=HashEmbeddingConfig(ngram_sizes=[2, 3, 5], buckets=61),
    )
    cfg.data.patching.mode = mode
    cfg.data.patching.threshold = threshold
    cfg.data.patching.max_patch_length = 4
    return cfg


def blt_model(cfg: Config, seed: int = 1):
    torch.manual_seed(seed)
    return build_model(cfg.model).eval()


def median_entropy(model) -> float:
    """A threshold that makes about half the positions start a patch."""
    H = document_entropies(model, [PROMPT * 3], model.window)[0][1:]
    return float(np.median(H.astype(np.float16)))


def check_cached_equals_full(full_logits: torch.Tensor, decoder, result) -> tuple[list[int], list[int]]:
    """Asserts position i's cached logits == the full pass's; returns (the full pass's greedy
    picks at the generated positions, the tokens generated there)."""
    cached = torch.stack(decoder.logits)
    assert cached.shape[0] == len(result.tokens) - 1 == full_logits.shape[0]
    torch.testing.assert_close(cached, full_logits, atol=ATOL, rtol=0)
    masked = full_logits.clone()
    masked[:, decoder.banned] = -math.inf
    picks = masked[result.prompt_tokens - 1 :].argmax(-1).tolist()
    return picks, result.tokens[result.prompt_tokens :]


def blt_full_logits(model, decoder, result) -> torch.Tensor:
    starts = decoder.layout_starts(len(result.tokens))
    lengths = torch.from_numpy(patch_lengths_from_starts(np.array(starts), sum(starts)))[None]
    tokens = torch.tensor([result.tokens])
    with torch.no_grad():
        return model(tokens, lengths, torch.zeros_like(tokens))[0, :-1]


@pytest.mark.parametrize("mode,sampling,latent_window", [
    ("entropy", GREEDY, None), ("entropy", SAMPLED, 3), ("space", GREEDY, None), ("space", SAMPLED, None),
])
def test_cached_blt_generation_equals_full_forward(mode, sampling, latent_window):
    entropy = entropy_model() if mode == "entropy" else None
    cfg = blt_config(mode, median_entropy(entropy) if entropy else None, latent_window)
    model = blt_model(cfg)
    with torch.no_grad():
        decoder = BLTDecoder(model, cfg, entropy, record=True)
        result = generate(decoder, PROMPT, 40, sampling)
    assert result.stopped == "max_bytes" and len(result.data) == 40
    starts = decoder.layout_starts(len(result.tokens))
    assert 1 < sum(starts) < len(starts)  # patches of one and of several bytes
    for attention in ("dense", "auto"):  # the reference, and the blocked/gather kernels
        cfg.model.attention = attention
        picks, sampled = check_cached_equals_full(blt_full_logits(model, decoder, result), decoder, result)
        if sampling.is_greedy:
            assert picks == sampled
    if entropy is not None:
        # The entropy model's cache gives the entropies the offline pass stores, chunked as it
        # chunks long documents (each chunk gets the stack's whole receptive field as context);
        # the online decisions are the batch patcher's on those entropies.
        fed = np.array(decoder.tokens)
        short_rows = receptive_field(entropy, entropy.window) + 8
        full_H = document_entropies(entropy, [fed], entropy.window, row_positions=short_rows)[0]
        assert np.abs(np.array(decoder.entropies) - full_H).max() < 4e-3  # float16 rounding of H ~ 5
        rule = PatchingRule.from_config(cfg.data.patching)
        assert patch_starts(fed, np.array(decoder.entropies, dtype=np.float16), rule).tolist() == decoder.patch_starts


def test_long_blt_prompt_prefills_in_chunks_like_byte_by_byte():
    """A prompt longer than PREFILL_CHUNK: the entropy model reads it in chunks; the logits,
    entropies and patch decisions are those of feeding it one byte at a time."""
    entropy = entropy_model()
    cfg = blt_config("entropy", median_entropy(entropy), None)
    model = blt_model(cfg)
    prompt = (PROMPT * 40)[:PREFILL_CHUNK + 100]
    with torch.no_grad():
        chunked = BLTDecoder(model, cfg, entropy, record=True)
        result = generate(chunked, prompt, 3, GREEDY)
        one_by_one = BLTDecoder(model, cfg, entropy, record=True)
        for token in result.tokens[:-1]:
            one_by_one.feed(token)
    assert chunked.patch_starts == one_by_one.patch_starts and 1 < sum(chunked.patch_starts)
    np.testing.assert_allclose(chunked.entropies, one_by_one.entropies, atol=4e-3, rtol=0)  # float16 steps
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one_by_one.logits), atol=ATOL, rtol=0)
    check_cached_equals_full(blt_full_logits(model, chunked, result), chunked, result)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_cached_byte_lm_generation_equals_full_forward(sampling):
    model = entropy_model(seed=2)  # a byte LM with a window of 8, grouped-query attention
    with torch.no_grad():
        decoder = ByteLMDecoder(model, record=True)
        result = generate(decoder, PROMPT, 40, sampling)
        full = model(torch.tensor([result.tokens]))[0, :-1]
    picks, sampled = check_cached_equals_full(full, decoder, result)
    assert picks == sampled or not sampling.is_greedy


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    return str(sentencepiece_bpe(tmp_path_factory.mktemp("tok")))


def bpe_model(vocab_size: int):
    torch.manual_seed(4)
    return build_model(ModelConfig(family="bpe", vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4)).eval()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_cached_bpe_generation_equals_full_forward(tokenizer, sampling):
    model = bpe_model(300)
    with torch.no_grad():
        decoder = TokenLMDecoder(model, tokenizer, record=True)
        result = generate(decoder, PROMPT, 60, sampling)
        full = model(torch.tensor([result.tokens]))[0, :-1]
    picks, sampled = check_cached_equals_full(full, decoder, result)
    assert picks == sampled or not sampling.is_greedy
    assert decoder.tokenizer.decode(result.tokens[result.prompt_tokens :])[:60] == result.data


def test_long_prompt_prefills_in_chunks_like_one_pass():
    model = entropy_model(seed=5)
    prompt = bytes(range(256)) * 2  # 513 positions: three prefill chunks, every byte value
    with torch.no_grad():
        decoder = ByteLMDecoder(model, record=True)
        result = generate(decoder, prompt, 3, GREEDY)
        full = model(torch.tensor([result.tokens]))[0, :-1]
    check_cached_equals_full(full, decoder, result)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible():
    model = entropy_model(seed=2)
    runs = [generate(ByteLMDecoder(model), PROMPT, 30, Sampling(temperature=1.5, seed=seed)).data for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0, -1.0, 6.0])
    banned = [7]
    probs = next_token_probs(logits, Sampling(top_k=3), banned)
    assert (probs > 0).nonzero().flatten().tolist() == [1, 2, 3] and probs.sum() == pytest.approx(1)
    full = next_token_probs(logits, Sampling(), banned)
    assert full[7] == 0 and (full[:7] > 0).all()
    # top-p: the smallest set of most likely ids holding >= p of the mass
    for p in (0.3, 0.6, 0.9, 0.99):
        kept = (next_token_probs(logits, Sampling(top_p=p), banned) > 0).nonzero().flatten().tolist()
        order = full.argsort(descending=True).tolist()
        mass = full[order].cumsum(0)
        expected = order[: int((mass < p).sum()) + 1]
        assert sorted(kept) == sorted(expected)
    assert (next_token_probs(logits, Sampling(top_p=1e-6), banned) > 0).sum() == 1
    # top-k 1 is greedy
    model = entropy_model(seed=2)
    assert generate(ByteLMDecoder(model), PROMPT, 20, Sampling(top_k=1, seed=9)).data == \
        generate(ByteLMDecoder(model), PROMPT, 20, GREEDY).data
    with pytest.raises(Exception, match="top-p"):
        Sampling(top_p=0)


class ScriptedDecoder(ByteLMDecoder):
    """Says 'abc', then EOS, whatever it is fed."""

    def __init__(self):
        self.tokens, self.script = [], [ord(c) + OFFSET for c in "abc"] + [EOS_ID, ord("z") + OFFSET]

    def logits_for(self) -> torch.Tensor:
        logits = torch.zeros(260)
        logits[self.script[len(self.tokens) - self.prompt_len]] = 10.0
        logits[BOS_ID] = 20.0  # banned: never sampled
        return logits

    def prefill(self, prompt):
        self.tokens = self.encode_prompt(prompt)
        self.prompt_len = len(self.tokens)
        return self.logits_for()

    def feed(self, token):
        self.tokens.append(token)
        return self.logits_for()


def test_generation_stops_at_eos_and_at_the_byte_limit():
    result = generate(ScriptedDecoder(), b"x", 100, GREEDY)
    assert (result.data, result.stopped, result.tokens[-1]) == (b"abc", "eos", EOS_ID)
    result = generate(ScriptedDecoder(), b"x", 2, GREEDY)
    assert (result.data, result.stopped) == (b"ab", "max_bytes")
    assert generate(ScriptedDecoder(), b"x", 0, GREEDY).data == b""


def test_terminal_output_is_escaped():
    assert printable(b"ok\x00\x1b[1m\xff caf\xc3\xa9\n\t") == "ok\\x00\\x1b[1m\\xff caf\u00e9\n\t"


# ---------------------------------------------------------------------------------------------
# Exports and the CLI


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("exports")
    paths = {}
    for name, seed in (("entropy", 0), ("other_entropy", 11)):
        cfg = Config()
        cfg.model = entropy_model(seed).cfg
        paths[name] = save_export(entropy_model(seed).state_dict(), cfg, root / name)
    cfg = blt_config("entropy", median_entropy(entropy_model()))
    cfg.data.entropy_model = str(paths["entropy"])
    cfg.data.train = str(root / "no-such-dataset")
    paths["blt"] = save_export(blt_model(cfg).state_dict(), cfg, root / "blt")
    space = blt_config("space")
    paths["blt_space"] = save_export(blt_model(space).state_dict(), space, root / "blt_space")
    bpe = Config()
    bpe.model = bpe_model(300).cfg
    bpe.data.tokenizer = tokenizer
    paths["bpe"] = save_export(bpe_model(300).state_dict(), bpe, root / "bpe")
    return paths


def test_cli_generates_for_every_family_and_writes_raw_bytes(exports, tmp_path, capsys):
    for name in ("blt", "blt_space", "bpe", "entropy"):
        out = tmp_path / f"{name}.bin"
        assert main(["generate", "--model", str(exports[name]), "--prompt", "the cat", "--max-bytes", "24",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--out", str(out)]) == 0
        printed, summary = capsys.readouterr()
        assert printed == printable(out.read_bytes()) + "\n" and len(out.read_bytes()) <= 24
        assert "bytes/s" in summary and ("patches" in summary) == name.startswith("blt")
        decoder, _ = load_decoder(exports[name])
        again = generate(decoder, b"the cat", 24, Sampling(temperature=0.8, top_p=0.9, seed=1))
        assert again.data == out.read_bytes()


def test_prompt_file_with_invalid_utf8_and_nul(exports, tmp_path, capsys):
    prompt = b"\xff\xfe\x00ab\xc3\x00\n"
    (tmp_path / "p.bin").write_bytes(prompt)
    for name in ("blt", "entropy"):
        assert main(["generate", "--model", str(exports[name]), "--prompt-file", str(tmp_path / "p.bin"),
                     "--greedy", "--max-bytes", "8"]) == 0
        capsys.readouterr()
        decoder, _ = load_decoder(exports[name])
        generate(decoder, prompt, 8, GREEDY)
        assert decoder.tokens[: len(prompt) + 1] == [BOS_ID] + [b + OFFSET for b in prompt]


def test_blt_entropy_model_missing_or_different_is_an_error(exports, tmp_path, capsys):
    def error(*extra, model=exports["blt"]):
        code = main(["generate", "--model", str(model), "--prompt", "hi", *extra])
        message = capsys.readouterr().err
        assert code != 0 and "Traceback" not in message
        return message

    assert "different entropy model" in error("--entropy-model", str(exports["other_entropy"]))
    assert "entropy model missing" in error("--entropy-model", str(tmp_path / "nothing"))

    # The recorded export gone, and none recorded at all.
    config = (exports["blt"] / "config.yaml").read_text()
    for recorded, expected in ((str(tmp_path / "gone"), "entropy model missing"), ("''", "records no entropy model")):
        moved = tmp_path / f"blt_{len(recorded)}"
        moved.mkdir()
        for f in exports["blt"].iterdir():
            (moved / f.name).write_bytes(f.read_bytes())
        (moved / "config.yaml").write_text(config.replace(str(exports["entropy"]), recorded))
        assert expected in error(model=moved)

    # The training entropies record another model than the one given (and than data.entropy_model).
    data = tmp_path / "entropies"
    data.mkdir()
    sha = export_info(exports["other_entropy"])["weights_sha256"]
    (data / "dataset.json").write_text(json.dumps({"entropy_model": {"weights_sha256": sha}}))
    moved = tmp_path / "blt_trained"
    moved.mkdir()
    for f in exports["blt"].iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "config.yaml").write_text(config.replace(str(exports["blt"].parent / "no-such-dataset"), str(data)))
    assert "use the model that produced the dataset" in error(model=moved)

    # Space patching needs no entropy model.
    assert main(["generate", "--model", str(exports["blt_space"]), "--prompt", "hi", "--max-bytes", "4"]) == 0


def test_bench_row_measures_both_sides():
    from blt_dist.bench.datapath import cached_generation_speed

    g = cached_generation_speed(16, timed_lengths=2)
    assert g["bytes"] == 16 and g["cached_bytes_per_s"] > 0 and g["full_bytes_per_s"] > 0 and g["speedup"] > 0
    assert 1 <= g["mean_patch"] <= 16


def test_blt_generation_computes_entropies_in_the_training_dtype():
    """With entropy_dtype="bf16" (what load_decoder passes for bf16 training entropies) the
    online entropies are the bf16 pass's, not the fp32 ones."""
    entropy = entropy_model()
    cfg = blt_config("entropy", median_entropy(entropy), None)
    model = blt_model(cfg)
    with torch.no_grad():
        decoder = BLTDecoder(model, cfg, entropy, record=True, entropy_dtype="bf16")
        generate(decoder, PROMPT, 40, GREEDY)
    fed = np.array(decoder.tokens)
    got = np.array(decoder.entropies)
    offline = {d: document_entropies(entropy, [fed], entropy.window, dtype=d)[0] for d in ("fp32", "bf16")}
    to_bf16, to_fp32 = (np.abs(got - offline[d]).mean() for d in ("bf16", "fp32"))
    assert to_bf16 < to_fp32 and np.abs(got - offline["bf16"]).max() < 0.05, (to_bf16, to_fp32)
