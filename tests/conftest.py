"""Test set-up through the one process set-up call: 8 fake CPU devices for the expert-parallel
tests (before jax creates its backend), one LAPACK thread (caldera_jax/runtime.py says why)."""
import os

from caldera_jax import runtime

runtime.setup(cpu_devices=8, lapack_threads=1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
