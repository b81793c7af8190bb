"""Host values onto a mesh as global arrays, the same code for one process or many (multi-host).

Every process of a job holds the same host values (the data pipeline depends only on the step and
the seed; the frozen weights come from the same files) and builds each global array from them,
materialising only the shards of its own devices, so nothing is sent between hosts to place data:

    batch = place(np_batch, NamedSharding(mesh, P("dp")))        # [B, T] rows split along dp
    state = place(state, NamedSharding(mesh, P()))               # replicated on every device

Only process 0 writes files that are not orbax checkpoints (`is_primary`); orbax saves and
restores are collective (every process calls them).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def global_array(a, sharding: NamedSharding) -> jax.Array:
    """The global array of host value `a` (numpy or jax, the same in every process) laid out as
    `sharding`; each process fills only its addressable shards."""
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, sharding: NamedSharding | Any) -> Any:
    """global_array over a pytree: `sharding` one NamedSharding for every leaf, or a pytree of them
    with `tree`'s structure."""
    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda a: global_array(a, sharding), tree)
    return jax.tree.map(global_array, tree, sharding)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def is_primary() -> bool:
    """True in the process that writes the job's files (process 0; the only one when alone)."""
    return jax.process_index() == 0
