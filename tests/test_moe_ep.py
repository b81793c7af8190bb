"""Expert-parallel MoE (caldera_jax.moe) against the dense single-device reference, on 8 fake CPU
devices: parity and gradients per mesh, both dispatch paths, whole models, dropped-token
accounting, mesh refusal."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import forward
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.moe import dense_moe, route
from caldera_jax.moe import Ragged, expert_parallel_hooks, make_mesh
from tests.hf_tiny import tiny_hf_model

NAME = "model.layers.0.mlp"
E, K, H, I, N = 8, 2, 16, 8, 64


def layer_cfg(hidden: int = H, layers: int = 1, **kw) -> ModelConfig:
    """A config whose only use is the MoE block: E=8 experts, top-2, expert width I=8."""
    return ModelConfig(model_type="qwen3_moe", vocab_size=16, hidden_size=hidden, intermediate_size=I,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=8, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, **kw)


def layer_params(seed: int = 0, hidden: int = H) -> tuple[dict, jax.Array]:
    """Random MoE block params and tokens x [N, hidden] (never all-zero)."""
    k = jax.random.split(jax.random.key(seed), 5)
    p = {"gate": {"weight": 0.5 * jax.random.normal(k[0], (E, hidden))},
         "experts": {"gate_proj": {"weight": 0.3 * jax.random.normal(k[1], (E, I, hidden))},
                     "up_proj": {"weight": 0.3 * jax.random.normal(k[2], (E, I, hidden))},
                     "down_proj": {"weight": 0.3 * jax.random.normal(k[3], (E, hidden, I))}}}
    return p, jax.random.normal(k[4], (N, hidden))


def run_layer(hooks: Hooks, cfg: ModelConfig, name: str = NAME):
    """(p, x) -> (y, aux) through hooks.moe (dense_moe when None), as moe_block calls it."""
    def f(p, x):
        ctx = Ctx(hooks, {})
        return (hooks.moe or dense_moe)(name, p, cfg, x, x, ctx), ctx.aux
    return f


def loss_and_grads(hooks: Hooks, cfg: ModelConfig):
    """jit((p, x) -> (y, (dL/dp, dL/dx))) with L = sum(y * r) for a fixed random r."""
    r = jax.random.normal(jax.random.key(99), (N, cfg.hidden_size))

    def f(p, x):
        def loss(p, x):
            y, _ = run_layer(hooks, cfg)(p, x)
            return jnp.sum(y * r), y
        (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return y, g
    return jax.jit(f)


def assert_close(a, b, rtol=1e-5):
    """Elementwise rtol with an absolute floor of rtol x the largest reference magnitude."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * float(np.max(np.abs(y))))


@pytest.fixture(scope="module")
def dense_ref():
    cfg = layer_cfg()
    p, x = layer_params()
    y, g = loss_and_grads(Hooks(), cfg)(p, x)
    return cfg, p, x, y, g


MESHES = {"ep2": dict(ep=2), "ep4": dict(ep=4), "ep8": dict(ep=8), "ep4xdp2": dict(ep=4, dp=2)}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_capacity_parity_and_grads(dense_ref, mesh):
    cfg, p, x, y_ref, g_ref = dense_ref
    y, g = loss_and_grads(expert_parallel_hooks(make_mesh(**MESHES[mesh])), cfg)(p, x)
    assert float(jnp.max(jnp.abs(y_ref))) > 0
    assert_close(y, y_ref)
    assert_close(g, g_ref)


@pytest.mark.parametrize("mesh", ["ep8", "ep4xdp2"])
def test_ragged_path_parity_and_grads(dense_ref, mesh):
    """The dropless ragged path's offsets, with ragged_all_to_all emulated (XLA:CPU has none)."""
    cfg, p, x, y_ref, g_ref = dense_ref
    hooks = expert_parallel_hooks(make_mesh(**MESHES[mesh]), dispatch=Ragged(emulate=True))
    y, g = loss_and_grads(hooks, cfg)(p, x)
    assert_close(y, y_ref)
    assert_close(g, g_ref)


def test_tensor_parallel_experts(dense_ref):
    cfg, p, x, y_ref, _ = dense_ref
    y, _ = jax.jit(run_layer(expert_parallel_hooks(make_mesh(ep=2, dp=2, tp=2)), cfg))(p, x)
    assert_close(y, y_ref)


def test_ragged_on_cpu_falls_back_with_notice(dense_ref):
    from caldera_jax.moe.dispatch import RaggedFallbackWarning
    cfg, p, x, y_ref, _ = dense_ref
    hooks = expert_parallel_hooks(make_mesh(ep=4), dispatch="ragged")
    with pytest.warns(RaggedFallbackWarning, match="ragged_all_to_all") as rec:
        y, aux = jax.jit(run_layer(hooks, cfg))(p, x)
    notices = [w for w in rec if issubclass(w.category, RaggedFallbackWarning)]
    assert len(notices) >= 1 and "\n" not in str(notices[0].message)
    assert int(aux[f"{NAME}.dropped"]) == 0
    assert_close(y, y_ref)


def test_explicit_mesh_layer(dense_ref):
    cfg, p, x, y_ref, _ = dense_ref
    mesh = make_mesh(ep=4, dp=2, explicit=True)
    p, x = jax.device_put((p, x), NamedSharding(mesh, P()))
    y, _ = jax.jit(run_layer(expert_parallel_hooks(mesh), cfg))(p, x)
    assert_close(y, y_ref)


def _numpy_capacity_moe(p, x, cfg, shards: int, capacity: int):
    """Numpy recount of the capacity rule: per token shard and expert, first choices are served
    before second choices, in token order, up to `capacity`. Returns (y [N, H], dropped)."""
    idx, w = (np.asarray(a) for a in route(x @ p["gate"]["weight"].T, cfg))
    xs, ex = np.asarray(x, np.float64), {k: np.asarray(v["weight"], np.float64) for k, v in p["experts"].items()}
    y, dropped, n = np.zeros_like(xs), 0, x.shape[0] // shards
    for s in range(shards):
        used = np.zeros(cfg.num_experts, int)
        for choice in range(cfg.num_experts_per_tok):
            for t in range(s * n, (s + 1) * n):
                e = idx[t, choice]
                if used[e] >= capacity:
                    dropped += 1
                    continue
                used[e] += 1
                g, u = ex["gate_proj"][e] @ xs[t], ex["up_proj"][e] @ xs[t]
                y[t] += w[t, choice] * (ex["down_proj"][e] @ (g / (1 + np.exp(-g)) * u))
    return y, dropped


def test_dropped_tokens_counted_and_skipped(dense_ref):
    cfg, p, x, _, _ = dense_ref
    factor, shards = 0.5, 8
    capacity = int(np.ceil(factor * (N // shards) * K / E))
    hooks = expert_parallel_hooks(make_mesh(ep=4, dp=2), capacity_factor=factor)
    y, aux = jax.jit(run_layer(hooks, cfg))(p, x)
    y_np, dropped = _numpy_capacity_moe(p, x, cfg, shards, capacity)
    assert dropped > 0
    assert int(aux[f"{NAME}.dropped"]) == dropped
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-5 * np.max(np.abs(y_np)))


def test_bad_mesh_refused(dense_ref):
    cfg, p, x, _, _ = dense_ref
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by ep=4"):
        jax.jit(run_layer(expert_parallel_hooks(make_mesh(ep=4)), cfg.replace(num_experts=6)))(p, x)
    with pytest.raises(ValueError, match=r"60 tokens .* not divisible by dp\*ep=8"):
        jax.jit(run_layer(expert_parallel_hooks(make_mesh(ep=4, dp=2)), cfg))(p, x[:60])
    with pytest.raises(ValueError, match=r"mesh dp=1 x ep=8 x tp=2 needs 16 devices"):
        make_mesh(ep=8, tp=2)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_whole_model_expert_parallel(family, tmp_path):
    from caldera_jax.checkpoints_io.hf import load_hf
    path, _ = tiny_hf_model(family, tmp_path, num_hidden_layers=2)
    cfg, params = load_hf(path)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    ref = forward(params, cfg, tokens)
    hooks = expert_parallel_hooks(make_mesh(ep=4, dp=2))
    got = forward(params, cfg, tokens, hooks=hooks)
    assert_close(got, ref)
    with pytest.raises(ValueError, match="not divisible by dp\\*ep=8"):
        forward(params, cfg, tokens[:, :3], hooks=hooks)
