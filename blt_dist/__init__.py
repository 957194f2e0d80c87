"""blt-dist: distributed pretraining of Byte Latent Transformers and FLOP-matched BPE baselines."""

__version__ = "0.1.0"
