"""`blt-dist tokenizer`: a sentencepiece BPE tokenizer that accounts for every raw byte.

Bits per byte for BPE must divide by the same raw bytes as BLT, so every token carries the
number of raw bytes it stands for, and a document's tokens always cover exactly its bytes:

  * training uses identity normalisation, no dummy prefix and no whitespace clean-up, so the
    pieces of a text concatenate back to the text itself;
  * byte_fallback gives the 256 byte pieces <0x00>..<0xFF>; invalid UTF-8 and the character
    U+2581 (sentencepiece's own stand-in for a space, which it would turn into a space on the
    way back) are sent as byte pieces directly;
  * `encode_document` checks that the byte counts add up to the document's length, always.

Special ids mirror the byte vocabulary: PAD 0, BOS 1, EOS 2, UNK 3.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from blt_dist.data.shards import ByteDataset
from blt_dist.errors import UserError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPACE_MARK = "\u2581"
_AS_BYTES = re.compile("([\udc80-\udcff\u2581]+)")  # surrogate-escaped invalid bytes, U+2581


class ByteExactTokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"{path}: no such tokenizer model (train one with `blt-dist tokenizer`)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path}: not a sentencepiece model ({err})") from err
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        if (self.pad_id, self.bos_id, self.eos_id) != (PAD, BOS, EOS):
            raise UserError(f"{path}: special ids (pad, bos, eos) = {(self.pad_id, self.bos_id, self.eos_id)}, expected (0, 1, 2)")
        self.byte_ids = np.array([self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)], dtype=np.int64)
        if (self.byte_ids == self.sp.unk_id()).any():
            raise UserError(f"{path}: trained without byte_fallback; it cannot represent every byte")
        self.piece_bytes = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                self.piece_bytes[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                self.piece_bytes[i] = len(self.sp.id_to_piece(i).replace(_SPACE_MARK, " ").encode("utf-8"))

    def encode_document(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """BOS + tokens + EOS, and the raw bytes each id stands for (0 for BOS/EOS)."""
        pieces: list[np.ndarray] = [np.array([self.bos_id], dtype=np.int64)]
        text = data.decode("utf-8", "surrogateescape")
        for i, segment in enumerate(_AS_BYTES.split(text)):
            if not segment:
                continue
            if i % 2:  # raw bytes: one byte piece each
                raw = np.frombuffer(segment.encode("utf-8", "surrogateescape"), dtype=np.uint8)
                pieces.append(self.byte_ids[raw])
            else:
                pieces.append(np.asarray(self.sp.encode(segment, out_type=int), dtype=np.int64))
        pieces.append(np.array([self.eos_id], dtype=np.int64))
        ids = np.concatenate(pieces)
        nbytes = self.piece_bytes[ids]
        if int(nbytes.sum()) != len(data):
            raise UserError(
                f"{self.path}: tokens cover {int(nbytes.sum())} bytes of a {len(data)}-byte document; "
                "the model was not trained by `blt-dist tokenizer` (normalisation must be identity)"
            )
        return ids, nbytes

    def decode(self, ids) -> bytes:
        """Token ids back to raw bytes (specials dropped)."""
        out = bytearray()
        for i in np.asarray(ids, dtype=np.int64).tolist():
            if self.sp.is_byte(i):
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))
            elif self.piece_bytes[i]:
                out += self.sp.id_to_piece(i).replace(_SPACE_MARK, " ").encode("utf-8")
        return bytes(out)


def _training_lines(dataset, max_bytes: int):
    """Lines of the train split's documents (valid UTF-8 parts only), up to max_bytes."""
    seen = 0
    for _, sample in dataset.documents("train"):
        text = sample["data"].decode("utf-8", "replace")
        for line in text.split("\n"):
            if line:
                yield line
                seen += len(line)
        if seen >= max_bytes:
            return


def train_tokenizer(dataset_dir: str | Path, out: str | Path, vocab_size: int, max_bytes: int = 50_000_000) -> dict:
    """Trains on the train split; measures bytes per token on val (or train). Writes OUT (.model)
    and OUT with .json: vocab size, bytes per token, dataset fingerprint."""
    dataset = ByteDataset(dataset_dir)
    out = Path(out)
    if out.suffix != ".model":
        raise UserError(f"--out {out}: expected a path ending in .model")
    if vocab_size < 256 + 4 + 16:
        raise UserError(f"--vocab-size {vocab_size}: must exceed 276 (256 byte pieces + specials + merges)")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(dataset, max_bytes),
        model_prefix=str(out.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        unk_id=UNK,
        num_threads=2,
        minloglevel=2,
    )
    train_seconds = time.perf_counter() - started
    tokenizer = ByteExactTokenizer(out)
    split = "val" if dataset.streams("val") else "train"
    tokens = nbytes = 0
    for _, sample in dataset.documents(split):
        ids, counts = tokenizer.encode_document(sample["data"])
        tokens += len(ids) - 2  # BOS/EOS are not text
        nbytes += int(counts.sum())
        if nbytes > 20_000_000:
            break
    info = {
        "vocab_size": vocab_size,
        "bytes_per_token": nbytes / max(tokens, 1),
        "measured_on": f"{split} split, {nbytes} bytes",
        "dataset_fingerprint": dataset.fingerprint,
        "train_seconds": round(train_seconds, 2),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def measured_bytes_per_token(model_path: str | Path) -> float | None:
    """The bytes per token `train_tokenizer` measured, from the .json it wrote beside the model
    (None when there is none: a tokenizer made elsewhere)."""
    info = Path(model_path).with_suffix(".json")
    try:
        return float(json.loads(info.read_text())["bytes_per_token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="byte dataset (from `blt-dist prepare`)")
    parser.add_argument("--out", required=True, help="tokenizer model path, ending in .model")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes", type=int, default=50_000_000, help="training text budget")


def run(args: argparse.Namespace) -> int:
    info = train_tokenizer(args.data, args.out, args.vocab_size, args.max_bytes)
    print(
        f"{args.out}: vocab {info['vocab_size']}, {info['bytes_per_token']:.3f} bytes/token "
        f"({info['measured_on']}), trained in {info['train_seconds']} s"
    )
    print(f"use: data.tokenizer={args.out} data.bytes_per_token={info['bytes_per_token']:.3f}")
    return 0
