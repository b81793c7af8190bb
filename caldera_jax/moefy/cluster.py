"""Balanced clustering of one FFN's neurons into E experts of exactly I/E neurons each.

    feats = coactivation_features(mlp, x, tokens=4096)    # [I, T]: |activation| of each neuron per token
    feats = weight_features(mlp)                           # [I, 2H]: its gate and up rows
    clusters = balanced_kmeans(feats, E, seed)             # [E, I/E] int: neuron indices per expert
    clusters, hist = refine_for_routing(mlp, x, clusters, top_k, iters=10)

Spherical k-means (cosine similarity) where every assignment step is an exact balanced
assignment: a linear assignment of I neurons to E clusters of I/E slots each (scipy's
linear_sum_assignment on the similarity matrix with each centroid repeated I/E times). Output is
canonical: neurons ascending within an expert, experts ordered by their smallest neuron; the result
depends only on the features and the seed (numpy, float64 on the host).

Refinement (routing-aware): alternate (a) each token's oracle choice of top_k experts under the
current split (router_fit.oracle_choice), (b) a balanced reassignment of every neuron to the expert
where it adds the most to the tokens that choose that expert: neuron j's affinity to expert e is
sum over tokens n choosing e of a_nj * <down_j, y_n> (its share of the projection of the dense
output y_n on itself). Both steps aim at the same thing, the chosen experts carrying the dense
output; the split with the highest oracle recovery seen is kept.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from caldera_jax.moefy.router_fit import oracle_choice


@jax.jit
def _abs_activations(mlp: dict, x: jax.Array) -> jax.Array:
    g = x @ mlp["gate_proj"]["weight"].T
    u = x @ mlp["up_proj"]["weight"].T
    return jnp.abs(jax.nn.silu(g) * u)                   # [N, I]


def coactivation_features(mlp: dict, x: np.ndarray, tokens: int | None = None) -> np.ndarray:
    """Each neuron's |silu(gate)·up| over the first `tokens` calibration tokens x [N, H] -> [I, T]:
    neurons that fire on the same tokens get similar rows."""
    x = np.asarray(x, np.float32)[:tokens]
    a = np.asarray(_abs_activations(jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)), np.float64)
    return a.T


def weight_features(mlp: dict) -> np.ndarray:
    """Each neuron's gate and up rows, each unit-normalised, side by side: [I, 2H]."""
    def unit(w):
        w = np.asarray(w, np.float64)
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return np.concatenate([unit(mlp["gate_proj"]["weight"]), unit(mlp["up_proj"]["weight"])], axis=1)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """sim [n, k] (higher = closer) -> labels [n] with exactly `size` = n / k items per cluster,
    maximising the total similarity (exact: a linear assignment to k * size slots)."""
    n, k = sim.shape
    if n != k * size:
        raise ValueError(f"balanced_assign: {n} items do not fill {k} clusters of {size}")
    _, slot = linear_sum_assignment(np.repeat(sim, size, axis=1), maximize=True)
    return (slot // size).astype(np.int64)


def _init_centroids(f: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with cosine distance."""
    n = f.shape[0]
    idx = [int(rng.integers(n))]
    dist = 1.0 - f @ f[idx[0]]
    for _ in range(1, k):
        p = np.maximum(dist, 0.0)
        p = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
        j = int(rng.choice(n, p=p))
        idx.append(j)
        dist = np.minimum(dist, 1.0 - f @ f[j])
    return f[idx].copy()


def canonical(labels: np.ndarray, k: int) -> np.ndarray:
    """labels [n] (each cluster n/k items) -> [k, n/k]: members ascending, clusters ordered by
    their smallest member."""
    groups = [np.flatnonzero(labels == c) for c in range(k)]
    groups.sort(key=lambda g: int(g[0]))
    return np.stack(groups).astype(np.int64)


def balanced_kmeans(feats: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """feats [n, d] -> clusters [k, n/k] (see the module docstring). Deterministic under `seed`."""
    n = feats.shape[0]
    if n % k:
        raise ValueError(f"balanced_kmeans: {k} clusters do not divide {n} items")
    if k == 1:
        return np.arange(n, dtype=np.int64)[None]
    f = _unit_rows(np.asarray(feats, np.float64))
    rng = np.random.default_rng(seed)
    cent = _init_centroids(f, k, rng)
    labels = None
    for _ in range(max(iters, 1)):
        new = balanced_assign(f @ cent.T, n // k)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        cent = _unit_rows(np.stack([f[labels == c].sum(0) for c in range(k)]))
    return canonical(labels, k)


def check_clusters(clusters: np.ndarray, n: int, k: int) -> None:
    """A partition of range(n) into k experts of n/k neurons each (raises ValueError otherwise)."""
    c = np.asarray(clusters)
    if c.shape != (k, n // k) or n % k or not np.array_equal(np.sort(c.reshape(-1)), np.arange(n)):
        raise ValueError(f"clusters of shape {c.shape} are not a balanced partition of {n} neurons into {k}")


@jax.jit
def _neuron_terms(mlp: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a [N, I] = silu(gate x) * up x, and p [N, I] = a_nj * <down_j, y_n> (sum_j p_nj = ||y_n||^2)."""
    wd = mlp["down_proj"]["weight"]
    a = jax.nn.silu(x @ mlp["gate_proj"]["weight"].T) * (x @ mlp["up_proj"]["weight"].T)
    return a, a * ((a @ wd.T) @ wd)


@partial(jax.jit, static_argnames=("k",))
def _oracle_under(a: jax.Array, wd: jax.Array, clusters: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The oracle's choice [N, E] under the split `clusters`, and the fraction it recovers."""
    c = jnp.einsum("nej,ehj->neh", a[:, clusters], wd[:, clusters].transpose(1, 0, 2))   # [N, E, H]
    G = jnp.einsum("neh,nfh->nef", c, c)
    chosen = oracle_choice(G, k)
    d = 1.0 - chosen
    return chosen, 1.0 - jnp.sum(jnp.einsum("ne,nef,nf->n", d, G, d)) / jnp.sum(G)


def refine_for_routing(mlp: dict, x: np.ndarray, clusters: np.ndarray, k: int, iters: int
                       ) -> tuple[np.ndarray, list[float]]:
    """Routing-aware refinement of a balanced split (see the module docstring) on tokens x [N, H].
    Returns (the best split seen, canonical; the oracle recovery of each split visited)."""
    E, size = clusters.shape
    p_mlp = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), mlp)
    a, p = _neuron_terms(p_mlp, jnp.asarray(x, jnp.float32))
    wd = p_mlp["down_proj"]["weight"]
    best, best_rec, history = clusters, -np.inf, []
    for _ in range(iters + 1):
        chosen, rec = _oracle_under(a, wd, jnp.asarray(clusters), k)
        history.append(float(rec))
        if history[-1] > best_rec:
            best, best_rec = clusters, history[-1]
        if len(history) == iters + 1:
            break
        new = canonical(balanced_assign(np.asarray(p.T @ chosen, np.float64), size), E)
        if np.array_equal(new, clusters):
            break
        clusters = new
    return best, history
