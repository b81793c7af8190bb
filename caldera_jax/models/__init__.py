"""Decoder models as pure functions over parameter pytrees (see caldera_jax.params)."""
from caldera_jax.models.decoder import decode_step, forward, init_params, prefill
from caldera_jax.models.generate import generate
from caldera_jax.models.hooks import Hooks

__all__ = ["Hooks", "decode_step", "forward", "generate", "init_params", "prefill"]
