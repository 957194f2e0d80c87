"""Character-level noise: deterministic, near its rate, never splits UTF-8, every kind changes text."""
from __future__ import annotations

import json

import numpy as np
import pytest

from blt_dist.errors import UserError
from blt_dist.evaluation.noise import KINDS, NoiseSpec, add_noise, noised, parse_noise

TEXT = ("The quick brown fox jumps over the lazy dog. Größe, café, naïve; 日本語のテキスト; emoji 🙂🚀; "
        "Ελληνικά κείμενα. ") * 40
INVALID = b"\xff\xfe ok \xc3 \x80\x80 \xed\xa0\x80 end"  # stray bytes, a cut lead byte, an encoded surrogate


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_document_and_seed(kind):
    data = TEXT.encode()
    spec = NoiseSpec(kind, 0.1, seed=7)
    assert add_noise(data, spec, 3) == add_noise(data, spec, 3)
    assert add_noise(data, spec, 3) != add_noise(data, spec, 4)  # another document, other noise
    assert add_noise(data, spec, 3) != add_noise(data, NoiseSpec(kind, 0.1, seed=8), 3)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_changes_text_and_keeps_it_valid_utf8(kind):
    data = TEXT.encode()
    out = add_noise(data, NoiseSpec(kind, 0.05), 0)
    assert out != data
    out.decode("utf-8")  # strict: no character was split


@pytest.mark.parametrize("kind", ["case", "swap", "repeat", "mix"])
def test_invalid_bytes_are_left_exactly_where_they_are(kind):
    # at rate 1 every character is touched; the invalid bytes must survive, in order
    data = INVALID * 5
    out = add_noise(data, NoiseSpec(kind, 1.0), 0)
    escaped = lambda b: [c for c in b.decode("utf-8", "surrogateescape") if 0xDC80 <= ord(c) <= 0xDCFF]
    assert escaped(out) == escaped(data)


def test_deleting_every_character_leaves_only_the_invalid_bytes():
    # (they may then read as a valid character, b"\xc3 \x80" -> b"\xc3\x80": the bytes are unchanged)
    out = add_noise(INVALID * 2, NoiseSpec("delete", 1.0), 0)
    assert out == b"\xff\xfe\xc3\x80\x80\xed\xa0\x80" * 2


def test_rates_are_roughly_respected():
    chars = len(TEXT)
    data = TEXT.encode()
    rate = 0.1
    deleted = chars - len(add_noise(data, NoiseSpec("delete", rate), 0).decode())
    repeated = len(add_noise(data, NoiseSpec("repeat", rate), 0).decode()) - chars
    assert deleted == pytest.approx(rate * chars, rel=0.15)
    assert repeated == pytest.approx(rate * chars, rel=0.15)
    # case flips only letters with a one-character twin: the rate applies to those
    flippable = sum(1 for c in TEXT if len(c.swapcase()) == 1 and c.swapcase() != c)
    flipped = sum(a != b for a, b in zip(TEXT, add_noise(data, NoiseSpec("case", rate), 0).decode()))
    assert flipped == pytest.approx(rate * flippable, rel=0.15)
    # swaps: a pair per selected character that the previous one did not also select
    swapped = sum(a != b for a, b in zip(TEXT, add_noise(data, NoiseSpec("swap", rate), 0).decode()))
    assert swapped / 2 == pytest.approx(rate * (1 - rate) * chars, rel=0.25)


def test_rate_zero_and_empty_documents_are_unchanged():
    assert add_noise(TEXT.encode(), NoiseSpec("mix", 0.0), 0) == TEXT.encode()
    assert add_noise(b"", NoiseSpec("mix", 0.5), 0) == b""
    assert add_noise(INVALID, NoiseSpec("case", 0.0), 0) == INVALID


def test_stream_is_seeded_by_position():
    docs = [("prose", f"d{i}", TEXT.encode()) for i in range(3)]
    spec = parse_noise("mix:0.1", seed=1)
    out = list(noised(docs, spec))
    assert [o[:2] for o in out] == [d[:2] for d in docs]
    assert len({o[2] for o in out}) == 3  # identical documents get different noise
    assert out == list(noised(docs, spec))


def test_parse_noise():
    assert parse_noise("swap") == NoiseSpec("swap", 0.05, 0)
    assert parse_noise("Delete:0.2", seed=3) == NoiseSpec("delete", 0.2, 3)
    assert parse_noise("case:0.1").name == "case:0.1"
    for bad in ("shuffle", "case:x", "case:1.5"):
        with pytest.raises(UserError):
            parse_noise(bad)


def test_eval_cli_reports_noised_bpb_and_gap(tmp_path):
    from blt_dist.training.export import save_export
    from tests.conftest import run_cli
    from tests.test_evaluate import uniform_entropy_model

    model, cfg = uniform_entropy_model()
    save_export(model.state_dict(), cfg, tmp_path / "export")
    text = tmp_path / "a.txt"
    text.write_bytes(TEXT.encode()[:2000])
    result = run_cli("eval", "--model", str(tmp_path / "export"), "--files", str(text), "--noise", "repeat:0.1",
                     "--noise", "case", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    repeat = report["noised"]["repeat:0.1"]
    assert repeat["bytes"] > report["bytes"]  # bpb counts the noised bytes, the ones predicted
    # a uniform model: bpb = log2(260) x (bytes + 1 EOS) / bytes, clean and noised
    expected = lambda n: np.log2(260) * (n + 1) / n
    assert repeat["bpb"] == pytest.approx(expected(repeat["bytes"]), rel=1e-6)
    assert repeat["gap"] == pytest.approx(expected(repeat["bytes"]) - expected(report["bytes"]), rel=1e-4)
    assert report["noised"]["case:0.05"]["bytes"] == report["bytes"]
    bad = run_cli("eval", "--model", str(tmp_path / "export"), "--files", str(text), "--noise", "shuffle")
    assert bad.returncode == 2 and "noise kind 'shuffle'" in bad.stderr
