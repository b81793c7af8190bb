"""Checkpoint I/O: HF safetensors (hf.py), GGUF (gguf.py), the compressed CALDERA format (compressed.py)."""
from caldera_jax.checkpoints_io.errors import CheckpointError
from caldera_jax.checkpoints_io.hf import HFCheckpoint, load_hf, open_hf, save_hf


def load_compressed(*args, **kwargs):
    """See caldera_jax.checkpoints_io.compressed.load_compressed (imported lazily: it pulls in jax)."""
    from caldera_jax.checkpoints_io.compressed import load_compressed as impl
    return impl(*args, **kwargs)

__all__ = ["CheckpointError", "HFCheckpoint", "load_compressed", "load_hf", "open_hf", "save_hf"]
