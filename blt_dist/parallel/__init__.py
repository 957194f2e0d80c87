"""Parallelism applied from outside the model: DeepSpeed engine/config, pipeline stages."""
