"""BPE tokenizer: every raw byte accounted for, whatever the bytes."""
from __future__ import annotations

import numpy as np
import pytest

from blt_dist.data.prepare import prepare
from blt_dist.data.tokenizer import ByteExactTokenizer, train_tokenizer
from blt_dist.errors import UserError
from tests.test_prepare import ADVERSARIAL


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta épsilon 漢字 def return 42 {} [ ] \n".split(" ")
    for i in range(40):
        (root / "in" / f"{i}.txt").write_text(" ".join(rng.choice(words, 200)))
    prepare([root / "in"], root / "ds", val_fraction=0.2, progress=False)
    info = train_tokenizer(root / "ds", root / "tok.model", vocab_size=320)
    assert info["bytes_per_token"] > 1.0 and (root / "tok.json").is_file()
    return ByteExactTokenizer(root / "tok.model")


@pytest.mark.parametrize("data", ADVERSARIAL + ["▁ is U+2581, ▁▁".encode(), b" leading and trailing  ", b"\t\r\n"])
def test_round_trip_and_byte_counts(tokenizer, data):
    ids, nbytes = tokenizer.encode_document(data)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert nbytes[0] == nbytes[-1] == 0
    assert int(nbytes.sum()) == len(data)
    assert tokenizer.decode(ids) == data


def test_merges_are_used(tokenizer):
    ids, _ = tokenizer.encode_document(b"alpha beta gamma delta")
    assert len(ids) - 2 < len(b"alpha beta gamma delta") / 1.5


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer"):
        ByteExactTokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        ByteExactTokenizer(tmp_path / "junk.model")
