"""The one place process-wide settings are made: fake CPU devices, jax's compilation cache,
LAPACK threads, the Hugging Face libraries' offline mode, joining a multi-process (multi-host) job.
Entry points (experiments/*, bench/*, tests/conftest.py) call `setup` once, first; no library
module changes any of these on import or while running.

    from caldera_jax import runtime
    dist = runtime.distributed_env()                      # None: a single process
    runtime.setup(cpu_devices=8 // runtime.process_count(dist), compile_cache="~/.cache/caldera-jax/xla-cache")
    runtime.init_distributed(dist)                        # before any jax computation
"""
from __future__ import annotations

import ctypes
import glob
import os


def setup(*, cpu_devices: int | None = None, compile_cache: str | None = None,
          lapack_threads: int | None = 1, hf_offline: bool = False) -> None:
    """cpu_devices: on a CPU-only machine, make this many jax devices exist (XLA_FLAGS; effective
    only before jax creates its backend, i.e. before the first computation or jax.devices());
    an XLA_FLAGS device count already set by the user wins.
    compile_cache: jax's persistent compilation cache directory (None or "none": off), so a rerun
    or a resume skips the XLA compiles.
    lapack_threads: cap the OpenBLAS threads behind XLA:CPU's LAPACK calls (None: leave as is;
    $CALDERA_LAPACK_THREADS overrides). Measured here (2 cores): inside a jitted program XLA runs
    its thunks on its own pool while OpenBLAS's workers spin-wait; Cholesky / QR / SVD calls took
    0.5-1 s each instead of ~5 ms (one 1024² decomposition 18 s instead of 0.75 s).
    hf_offline: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless already set (there is no hub
    here: lm-eval and datasets then fail fast instead of retrying the network); effective only
    before huggingface_hub / datasets are imported."""
    if cpu_devices is not None and cpu_devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    if compile_cache and compile_cache != "none":
        import jax
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if hf_offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if lapack_threads is not None:
        limit_lapack_threads(int(os.environ.get("CALDERA_LAPACK_THREADS", lapack_threads)))


class DistributedError(ValueError):
    """The environment asks for a multi-process job but does not say enough to join it."""


_LAUNCHER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")    # launchers jax detects by itself


def distributed_env(environ=None) -> dict | None:
    """How this process joins a multi-process jax job, read from the environment; None: it runs
    alone. Returns the keyword arguments of `jax.distributed.initialize`:

    - JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID:
      any launcher (a shell loop, Kubernetes, torchrun-like scripts); all three or an error.
    - else SLURM (srun: SLURM_NTASKS > 1) or Open MPI (mpirun: OMPI_COMM_WORLD_SIZE > 1): jax
      detects the coordinator, the process count and the process id itself ({} plus the count).
    CALDERA_JAX_DISTRIBUTED=0 keeps every process alone (e.g. one srun task per independent job)."""
    env = os.environ if environ is None else environ
    if env.get("CALDERA_JAX_DISTRIBUTED", "1") == "0":
        return None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        out = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            v = env.get(var, "")
            if not v.isdigit():
                raise DistributedError(f"JAX_COORDINATOR_ADDRESS is set, so {var} must be a non-negative "
                                       f"integer; got {v!r}")
            out[key] = int(v)
        if not 0 <= out["process_id"] < out["num_processes"]:
            raise DistributedError(f"JAX_PROCESS_ID={out['process_id']} must be in [0, JAX_NUM_PROCESSES="
                                   f"{out['num_processes']})")
        return out
    for var in _LAUNCHER_SIZES:
        if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
            return {"num_processes": int(env[var])}
    return None


def process_count(dist: dict | None) -> int:
    """Processes in the job `distributed_env` described (1 when alone)."""
    return 1 if dist is None else int(dist.get("num_processes", 1))


def init_distributed(dist: dict | None) -> bool:
    """Joins the multi-process job `dist` (from `distributed_env`; None: nothing to do) with
    `jax.distributed.initialize`; call it before any jax computation. Afterwards jax.devices() are
    every process's devices, a mesh over them spans hosts, and each process feeds only its own
    shards (caldera_jax.train.placement). Returns whether it initialised."""
    if dist is None:
        return False
    import jax
    jax.distributed.initialize(**{k: v for k, v in dist.items()
                                  if k != "num_processes" or "coordinator_address" in dist})
    return True


def limit_lapack_threads(n: int) -> list[str]:
    """Sets scipy's bundled OpenBLAS (the LAPACK jaxlib calls on CPU) to n threads. Idempotent;
    returns the libraries it set (empty when none was found, e.g. no scipy)."""
    done = []
    try:
        import scipy
    except ImportError:            # pragma: no cover
        return done
    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:            # pragma: no cover
            continue
        for sym in ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                    "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(path)
                break
    return done
