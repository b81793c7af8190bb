"""The one place process-wide settings are made: fake CPU devices, jax's compilation cache,
LAPACK threads, the Hugging Face libraries' offline mode. Entry points (experiments/*, bench/*,
tests/conftest.py) call `setup` once, first; no library module changes any of these on import or
while running.

    from caldera_jax import runtime
    runtime.setup(cpu_devices=8, compile_cache="~/.cache/caldera-jax/xla-cache", lapack_threads=1)
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
