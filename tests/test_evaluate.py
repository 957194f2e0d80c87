"""`blt-dist eval`: bits per byte checked against hand-computed values."""
from __future__ import annotations

import json
import math

import pytest
import torch

from blt_dist.config import load_config
from blt_dist.data.prepare import prepare
from blt_dist.evaluation.evaluate import evaluate_model
from blt_dist.model import build_model
from blt_dist.model.weights import load_export
from blt_dist.training.export import save_export
from blt_dist.vocab import EOS_ID, OFFSET, VOCAB_SIZE
from tests.conftest import run_cli

DOCS = [b"hello world", b"", b"\xff\x00 bytes", b"a" * 700]


def uniform_entropy_model():
    cfg = load_config("configs/entropy/tiny.yaml", ["data.seq_len=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.zero_()  # logits 0 everywhere: p = 1/260 for every byte
    return model.eval(), cfg


def as_documents(docs):
    return iter([("test", f"doc{i}", d) for i, d in enumerate(docs)])


def test_uniform_model_bpb_is_log2_vocab_times_targets_over_bytes():
    model, cfg = uniform_entropy_model()
    result = evaluate_model(model, cfg, as_documents(DOCS))
    nbytes = sum(map(len, DOCS))
    targets = nbytes + len(DOCS)  # every byte, plus one EOS per document
    assert result["bytes"] == nbytes and result["targets"] == targets
    assert result["bpb"] == pytest.approx(math.log2(VOCAB_SIZE) * targets / nbytes, rel=1e-6)  # per-token NLL is fp32, sums are fp64
    per_doc = result["documents_detail"]
    assert [d["targets"] for d in per_doc] == [len(d) + 1 for d in DOCS]


def test_known_probabilities_model():
    """A model that puts probability 1/2 on EOS and spreads 1/2 over the rest."""
    _, cfg = uniform_entropy_model()

    class KnownModel(torch.nn.Module):
        def forward(self, tokens, doc_ids=None):
            logits = torch.zeros(*tokens.shape, VOCAB_SIZE)
            logits[..., EOS_ID] = math.log(VOCAB_SIZE - 1)  # p(EOS) = 259 / (259 + 259) = 1/2
            return logits

    result = evaluate_model(KnownModel(), cfg, as_documents([b"abc", b"xy"]))
    # 5 byte targets at p = 1/(2*259) and 2 EOS targets at p = 1/2, over 5 bytes
    expected_bits = 5 * math.log2(2 * 259) + 2 * 1.0
    assert result["bpb"] == pytest.approx(expected_bits / 5, rel=1e-6)  # per-token NLL is fp32, sums are fp64


def test_cli_on_dataset_and_files(tmp_path):
    model, cfg = uniform_entropy_model()
    save_export(model.state_dict(), cfg, tmp_path / "export")
    (tmp_path / "in" / "prose").mkdir(parents=True)
    for i, d in enumerate(DOCS):
        (tmp_path / "in" / "prose" / f"{i}.txt").write_bytes(d)
    prepare([tmp_path / "in"], tmp_path / "ds", val_fraction=0.0, progress=False)
    result = run_cli("eval", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "ds"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["by_content_type"]["prose"]["bytes"] == sum(map(len, DOCS))
    files = run_cli("eval", "--model", str(tmp_path / "export"), "--files", str(tmp_path / "in" / "prose" / "0.txt"))
    assert files.returncode == 0 and "bits/byte" in files.stdout
    missing = run_cli("eval", "--model", str(tmp_path / "nope"), "--files", "README.md")
    assert missing.returncode == 1 and "not a model export" in missing.stderr


def test_export_round_trip_gives_the_same_logits(tmp_path):
    model, cfg = uniform_entropy_model()
    torch.nn.init.normal_(model.output.weight)
    save_export(model.state_dict(), cfg, tmp_path / "export")
    loaded, _ = load_export(tmp_path / "export")
    tokens = torch.randint(OFFSET, VOCAB_SIZE, (2, 32))
    assert torch.equal(model(tokens), loaded(tokens))


@pytest.mark.parametrize("threshold, band", [(6.0, 2), (5.0, 2)])
def test_blt_records_positions_per_entropy_band(tmp_path, threshold, band):
    """A uniform entropy model gives every position ln 260 = 5.56 nats: all in the > 5 band, at
    any threshold; the bands count every position whose entropy the patcher read."""
    from blt_dist.data.entropies import document_entropies
    from blt_dist.data.patch_stats import patch_stats_from_counts
    from blt_dist.evaluation.evaluate import Encoder

    entropy, ecfg = uniform_entropy_model()
    save_export(entropy.state_dict(), ecfg, tmp_path / "entropy")
    cfg = load_config("configs/blt/tiny.yaml", ["data.patching.mode=entropy", f"data.patching.threshold={threshold}",
                                                f"data.train={tmp_path / 'none'}", "data.byte_capacity=128",
                                                "data.patches_per_sample=48", "data.patching.bos_alone=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    encoder = Encoder(cfg, str(tmp_path / "entropy"), None)
    docs = [b"hello world", b"\xff\x00 bytes", b"abc" * 30]
    # every encoded position but BOS, whose entropy is a fixed 0, not a prediction
    positions = sum(len(encoder.encode(d)[0]) - 1 for d in docs)
    assert all(document_entropies(entropy, [d], ecfg.model.attention_window)[0][0] == 0 for d in docs)
    record = evaluate_model(model, cfg, as_documents(docs), encoder=encoder)
    t = record["by_content_type"]["test"]
    assert t["entropy_band_positions"][band] == positions and sum(t["entropy_band_positions"]) == positions
    stats = patch_stats_from_counts(t["patch_length_histogram"], t["entropy_band_positions"], t["mean_patch_size"])
    assert stats.entropy_shares == {"<2": 0.0, "2-5": 0.0, ">5": 1.0}
    assert sum(stats.length_shares.values()) == pytest.approx(1.0) and stats.patches == t["patches"]
    if threshold == 5.0:  # every position above the threshold starts a patch: all patches 1 long
        assert stats.length_shares["1-4"] == 1.0
    else:  # none does: each BOS alone, then patches of max_patch_length (16) and one remainder per document
        # (12 and 9 positions for the short two, 5 x 16 + 11 for the 91 of the long one): 11 patches
        assert stats.patches == 11
        assert stats.length_shares["1-4"] == pytest.approx(3 / 11) and stats.length_shares["13-16"] == pytest.approx(5 / 11)
