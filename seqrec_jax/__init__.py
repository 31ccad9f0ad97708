"""Shared core of seqrec-jax: data, metrics, sharding, checkpoints and the train loop."""

__version__ = "0.1.0"
