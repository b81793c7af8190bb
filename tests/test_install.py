"""What installing caldera-jax puts on a user's import path, and that it shadows nobody.

transformers >= 5.25 imports Hugging Face's `kernels` distribution; a top-level `kernels/` of ours
(in the checkout, first on sys.path, or in a wheel) broke every tokenizer and model load. These
tests run from the repository root, as the documented commands do.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from experiments import assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a wheel may install: our one import name, and the .dist-info folder.
WHEEL_TOP_LEVEL = {"caldera_jax"}
# Import names owned by other distributions that a generic name of ours could collide with.
FOREIGN = ("kernels", "experiments", "checkpoints_io", "bench", "tests", "configs")


def _run_from_root(code: str) -> str:
    """Run `code` in a fresh interpreter with the repository root first on sys.path (as `python -m
    experiments.X` from the root has it); returns stdout, fails the test with stderr."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_hf_kernels_importable_from_repository_root():
    """transformers' hub-kernels integration imports Hugging Face's `kernels`, not a folder of ours."""
    out = _run_from_root(
        "import importlib.metadata as md, pathlib\n"
        "import kernels, transformers.integrations.hub_kernels\n"
        "dist = md.distribution('kernels')\n"
        "print(pathlib.Path(kernels.__file__).resolve() == pathlib.Path(dist.locate_file('kernels/__init__.py')).resolve())\n")
    assert out.strip().splitlines()[-1] == "True", "`kernels` is not Hugging Face's distribution"


def test_no_top_level_package_shadows_an_installed_distribution():
    """No folder at the repository root is an importable package named like one that another
    installed distribution provides (`kernels` was: Hugging Face's)."""
    import importlib.metadata as md
    owned: dict[str, set[str]] = {}
    for dist in md.distributions():
        if dist.metadata["Name"] == "caldera-jax":
            continue
        names = set((dist.read_text("top_level.txt") or "").split())
        names |= {f.parts[0] for f in dist.files or () if len(f.parts) > 1 and f.parts[1] == "__init__.py"}
        for name in names:
            owned.setdefault(name, set()).add(dist.metadata["Name"])
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    clashes = {n: sorted(owned[n]) for n in ours & owned.keys()}
    assert not clashes, f"top-level packages of the checkout shadow installed distributions: {clashes}"


def test_transformers_builds_tokenizer_from_smollm2_gguf():
    """The failure users saw: transformers building a tokenizer from the SmolLM2 GGUF (what the
    asset converter does), from the checkout; it must equal the tokenizer the asset saved."""
    name = "smollm2-135m-instruct"
    if not assets.is_cached(name):
        pytest.fail(f"asset '{name}' is not cached: run `python -m experiments.assets fetch {name}`")
    d = assets.asset_path(name)
    gguf = d / assets.asset_info(name)["produced"]["gguf_path"]
    text = "The capital of France is Paris.\n<|im_start|>user"
    out = _run_from_root(
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"g = AutoTokenizer.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})\n"
        f"s = AutoTokenizer.from_pretrained({str(d)!r})\n"
        f"print(json.dumps([g({text!r}).input_ids, s({text!r}).input_ids]))\n")
    from_gguf, saved = json.loads(out.strip().splitlines()[-1])
    assert from_gguf == saved and len(saved) > 5


def test_wheel_installs_only_caldera_jax(tmp_path):
    """A built wheel holds our one import name (plus its .dist-info), the kernels' table and the
    lm-eval task YAMLs."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "caldera_jax", src / "caldera_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("caldera_jax-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == WHEEL_TOP_LEVEL, sorted(top)
    assert "caldera_jax/kernels/qlr_select.json" in names
    assert "caldera_jax/checkpoints_io/compressed.py" in names
    assert "caldera_jax/lmeval/tasks/arc_easy.yaml" in names          # the lm-eval tasks ship too
    assert not any(n.split("/", 1)[0] in FOREIGN for n in names)
