"""Training: the loop (loop.py, read top to bottom), checkpoints, the LR schedule, metrics and
the export a finished run writes. May import everything below it: parallel/, evaluation/, data/,
model/, flops, config; never bench/, launch/ or the commands.
"""
