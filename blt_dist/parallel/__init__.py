"""Parallelism applied from outside the model: the DeepSpeed engine, its config and collectives
(engine.py), pipeline stages with a plain sequential twin (pipeline.py). May import model/,
data/, flops and config; knows nothing of the training loop or of Slurm.
"""
