"""Model section of the config tree.

Placeholder shape: the models issue fills in the per-family fields. `validate` returns
(key path, message) pairs; the config loader turns the first one into a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass

MODEL_FAMILIES = ("entropy", "blt", "bpe")


@dataclass
class ModelConfig:
    family: str = "blt"

    def validate(self, prefix: str = "model") -> list[tuple[str, str]]:
        if self.family not in MODEL_FAMILIES:
            return [(f"{prefix}.family", f"one of {', '.join(MODEL_FAMILIES)}, got {self.family!r}")]
        return []
