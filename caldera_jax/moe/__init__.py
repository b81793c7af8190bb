"""Expert-parallel MoE with compression around the all-to-all (ECMoE).

    routing.py       router modes; the family top-k (caldera_jax.models.moe.route)
    dispatch.py      Capacity (dense all_to_all, drops counted) / Ragged (dropless) dispatch + combine
    codecs.py        Identity, IntQuant, FP8, Learned, StaleConditioned
    codec_params.py  codec params in the model tree; trainable/frozen split
    codec_spec.py    a codec named on a command line (fixed name or trained directory) -> params + hooks
    source.py        the token's own device (encode, stale, routing); SimulatedMoE, the one-device twin
    fold.py          a learned codec's linear decoder folded into the experts' gate/up weights
    ep.py            the shard_map layer, expert_parallel_hooks, make_mesh
    wire.py          bytes on the wire read from the compiled HLO
"""
from caldera_jax.moe.codec_params import add_codec_params, merge_params, split_codec_params
from caldera_jax.moe.codecs import FP8, Identity, IntQuant, Learned, StaleConditioned, codec_name, roundtrip
from caldera_jax.moe.dispatch import Capacity, Ragged
from caldera_jax.moe.ep import ExpertParallelMoE, check_mesh, expert_parallel_hooks, make_mesh
from caldera_jax.moe.source import SimulatedMoE, simulated_hooks
from caldera_jax.moe.routing import ROUTER_MODES

__all__ = ["FP8", "Identity", "IntQuant", "Learned", "StaleConditioned", "Capacity", "Ragged",
           "ExpertParallelMoE", "SimulatedMoE", "ROUTER_MODES", "add_codec_params", "check_mesh",
           "codec_name", "expert_parallel_hooks", "make_mesh", "merge_params", "roundtrip",
           "simulated_hooks", "split_codec_params"]
