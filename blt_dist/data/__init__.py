"""The data plane: byte shards, entropy shards, patching, calibration, tokenizer and loaders.
May import model/ (the entropy model), config, vocab and errors; knows nothing of training,
evaluation or Slurm (`blt-dist entropies --slurm` is wired in cli.py from launch/).
"""
