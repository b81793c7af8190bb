"""Small building blocks: RMSNorm, rotary embeddings, SwiGLU MLP."""
from __future__ import annotations

import jax
import jax.numpy as jnp


from caldera_jax.config import ModelConfig, rope_inv_freq


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, cast back to x's dtype, then scale. x: [..., H]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, head_dim] for integer positions [B, T] (HF rotate_half layout)."""
    inv, attn_factor = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * attn_factor).astype(dtype), (jnp.sin(emb) * attn_factor).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def swiglu(ctx, name: str, p: dict, x: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)); p holds gate_proj/up_proj/down_proj. x: [..., H]."""
    g = ctx.linear(f"{name}.gate_proj", x, p["gate_proj"])
    u = ctx.linear(f"{name}.up_proj", x, p["up_proj"])
    return ctx.linear(f"{name}.down_proj", jax.nn.silu(g) * u, p["down_proj"])


