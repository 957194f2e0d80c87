"""The byte vocabulary shared by the entropy model, BLT and every loader.

As in the BLT reference: 256 byte values offset by 4 special ids. A document is encoded
BOS + bytes + EOS. Any byte string is valid input (invalid UTF-8, NUL, binary).
"""
from __future__ import annotations

import numpy as np

PAD_ID = 0  # padding / beginning-of-example filler; never a training target
BOS_ID = 1  # document start
EOS_ID = 2  # document end
DELIM_ID = 3  # reserved (BPE delimiter in the reference); unused here
OFFSET = 4  # byte b has id b + OFFSET
VOCAB_SIZE = 256 + OFFSET
IGNORE = -100  # a target that is not predicted (padding, document starts): skipped by the loss


def encode_document(data: bytes) -> np.ndarray:
    """BOS + bytes + EOS as int64 ids."""
    ids = np.empty(len(data) + 2, dtype=np.int64)
    ids[0] = BOS_ID
    ids[1:-1] = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + OFFSET
    ids[-1] = EOS_ID
    return ids


def decode_ids(ids) -> bytes:
    """Byte ids back to bytes; specials are dropped."""
    arr = np.asarray(ids, dtype=np.int64)
    arr = arr[arr >= OFFSET] - OFFSET
    return arr.astype(np.uint8).tobytes()
