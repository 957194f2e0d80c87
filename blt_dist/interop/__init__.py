"""Hugging Face interop: project exports <-> transformers directories.

    hf_llama.py   the LM families (bpe, byte) <-> LlamaForCausalLM: key names and the rotary
                  permutation; what HF cannot express is listed, never approximated
    hf_blt.py     a meta-layout BLT + its entropy model as BltForCausalLM (+ BltPatcher): config, keys, threshold
    hf_export.py  `blt-dist export RUN --hf OUT`
    meta_blt.py   Meta's own BLT checkpoint layout -> BltForCausalLM's config and names (then hf_import)
    hf_import.py  `blt-dist import-hf DIR --out EXPORT`

Above training (it writes project exports with training/export.py), below the commands.
"""
from __future__ import annotations

from blt_dist.errors import UserError


class InteropError(UserError):
    """A directory or run that cannot be converted: one line, exit status 2."""

    exit_code = 2
