"""Imports run one way and nothing happens on import.

The layers, bottom to top (README, "Layout"): a module imports only from its own layer or below,
counting imports inside functions too (a function-level import must not be a way around a cycle),
and the module graph of the library has no cycle.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Longest prefix wins. Rank: a module may import from modules of the same or a lower rank.
LAYERS = {
    "caldera_jax.runtime": 0, "caldera_jax.config": 0, "caldera_jax.params": 0, "caldera_jax.families": 0,
    "caldera_jax.formats": 1,
    "caldera_jax.kernels": 2,
    "caldera_jax.linear": 3, "caldera_jax.models": 3, "caldera_jax.eval": 3, "caldera_jax.data": 3, "caldera_jax.train": 3,
    "caldera_jax.caldera": 4, "caldera_jax.moe": 4, "caldera_jax.moefy": 4, "caldera_jax.allocation": 4,
    "caldera_jax.checkpoints_io": 5,
    "caldera_jax.pipeline": 6, "caldera_jax.lmeval": 6,
    "experiments": 7,
    "bench": 8,
}
PACKAGES = ("caldera_jax", "experiments", "bench")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # relative
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}   # `from pkg import module`
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            files[_module_name(p)] = p
    graph = {}
    for name, p in files.items():
        deps = set()
        for m in _imports(p, name):
            while m and m not in files:                      # `from pkg import function`: the module
                m = m.rpartition(".")[0]
            if m and m != name and not name.startswith(m + "."):   # a package's own __init__ excepted
                deps.add(m)
        graph[name] = deps
    return graph


def _rank(name: str) -> int | None:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def test_every_module_has_a_layer():
    missing = sorted(n for n in _graph() if n != "caldera_jax" and _rank(n) is None)
    assert not missing, f"add these to LAYERS (and the README's layout): {missing}"


def test_no_upward_import():
    bad = []
    for name, deps in sorted(_graph().items()):
        r = _rank(name)
        for d in sorted(deps):
            if d != "caldera_jax" and r is not None and _rank(d) is not None and _rank(d) > r:
                bad.append(f"{name} (layer {r}) imports {d} (layer {_rank(d)})")
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a cycle are found."""
    pkg = tmp_path / "caldera_jax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from caldera_jax.pipeline import b\n")
    (pkg / "pipeline").mkdir()
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "pipeline" / "b.py").write_text("from caldera_jax.models import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("caldera_jax",))
    with pytest.raises(AssertionError, match="caldera_jax.models.a \\(layer 3\\) imports caldera_jax.pipeline.b"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()


def test_importing_changes_no_process_state():
    """Importing every library module sets no environment variable that steers XLA, jax, threads,
    kernels or the hub (third-party libraries' own logging variables aside), no jax config, and starts no
    jax backend (XLA flags and thread pools are the entry points' business: runtime.setup)."""
    code = (
        "import os, sys, pkgutil, importlib, json\n"
        "env0 = dict(os.environ)\n"
        "import jax\n"
        "cfg0 = {k: getattr(jax.config, k) for k in ('jax_compilation_cache_dir', 'jax_enable_x64')}\n"
        "import caldera_jax\n"
        "names = [m.name for m in pkgutil.walk_packages(caldera_jax.__path__, 'caldera_jax.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "from jax._src import xla_bridge\n"
        "ours = ('XLA', 'JAX', 'CALDERA', 'OPENBLAS', 'OMP', 'MKL', 'TRITON', 'TOKENIZERS', 'HF_', 'CUDA')\n"
        "changed = [k for k in set(os.environ) | set(env0) if os.environ.get(k) != env0.get(k)]\n"
        "print(json.dumps({'env': sorted(k for k in changed if k.startswith(ours)),\n"
        "  'cfg': {k: getattr(jax.config, k) != v for k, v in cfg0.items()},\n"
        "  'backend': xla_bridge.backends_are_initialized(), 'n': len(names)}))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] > 30
    assert res["env"] == [], f"importing set environment variables: {res['env']}"
    assert not any(res["cfg"].values()), f"importing changed jax config: {res['cfg']}"
    assert res["backend"] is False, "importing created a jax backend (devices can no longer be set up)"
