"""Evaluation: bits per byte of a model on documents (evaluate.py), the BLT-vs-BPE report
(compare.py, statistics.py, plots.py), noise, the compressor rows, and generation. Reads
exports through model/weights.py; may import data/, model/, flops, config; never the trainer.
"""
