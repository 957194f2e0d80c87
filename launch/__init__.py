"""Slurm (submitit): launch, the task a job runs, requeue, sweeps, entropy arrays. The top layer:
may import any wing of blt_dist/; only blt_dist/cli.py imports it (to wire its commands).
"""
