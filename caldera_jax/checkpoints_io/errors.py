"""Errors raised by the checkpoint readers and writers."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written.

    The message names the file and, where relevant, the tensor, e.g.
    "/ckpt/model-00002-of-00003.safetensors: tensor 'model.layers.3.mlp.up_proj.weight' has shape
    (48, 32), expected (64, 32)".
    """
