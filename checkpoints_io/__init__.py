"""Checkpoint I/O: HF safetensors in and out (hf.py); GGUF and the compressed format come later."""
from checkpoints_io.errors import CheckpointError
from checkpoints_io.hf import HFCheckpoint, load_hf, open_hf, save_hf

__all__ = ["CheckpointError", "HFCheckpoint", "load_hf", "open_hf", "save_hf"]
