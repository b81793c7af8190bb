"""Loading a compressed checkpoint is safe and complete.

- A checkpoint never runs code: a stored object names a registry kind; a version-1 "__class__"
  loads only when it is exactly the historic path of an allow-listed class. Crafted layer files
  (with every sha256 in caldera_config.json recomputed, so only the allow-list stands in the way)
  are refused with CheckpointError and their payload never runs.
- load_compressed checks completeness against the model config (missing/extra tensors, shapes).
- Malformed or wrongly typed tensors are CheckpointErrors naming the file.
- Property (hypothesis): random byte corruption of any file of a small real checkpoint is refused
  with CheckpointError, never another exception, never a silent load of changed bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from caldera_jax.caldera import decompose as dec
from caldera_jax.caldera.config import compressible
from caldera_jax.formats import packing
from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.formats.quant import QuantSpec, quantize
from caldera_jax.caldera.spec import MatrixBudget
from caldera_jax.checkpoints_io import CheckpointError, load_hf
from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.checkpoints_io.fingerprint import fingerprint
from caldera_jax.models.decoder import forward
from caldera_jax.params import flatten, layer_prefix, layer_shapes
from tests.hf_tiny import tiny_hf_model

L0 = ck.layer_file(0)
L1 = ck.layer_file(1)
PROTECTED = "model.layers.1.self_attn.o_proj.weight"
BASE = dict(group_size=16, factor_group_size=8, iters=1, lplr_iters=1, requant_sweeps=0)
# every stored layout the writer emits: uniform codes + quantized factors, e8p 3-bit (codes2) with
# bf16 (dense) factors, asymmetric 3-bit uniform Q only (zeros, no factors, no signs)
BUDGETS = {
    "self_attn.q_proj.weight": MatrixBudget(quantizer="e8p", b_q=3, rank=4, b_l=16, b_r=16, **BASE),
    "self_attn.k_proj.weight": MatrixBudget(quantizer="uniform", b_q=3, rank=0, symmetric=False,
                                            incoherence=False, **BASE),
}
DEFAULT = MatrixBudget(quantizer="uniform", b_q=4, rank=4, b_l=8, b_r=8, **BASE)


# ------------------------------------------------------------------ a small real checkpoint
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A complete checkpoint of a tiny llama (2 layers, every linear 32 x 32) with every file a job
    writes: caldera_config.json, job.json, progress.json, globals, layers, tokenizer files."""
    tmp = tmp_path_factory.mktemp("sec")
    path, _ = tiny_hf_model("llama", tmp, intermediate_size=32, num_key_value_heads=4)
    cfg, params = load_hf(path)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    x = np.random.default_rng(0).standard_normal((96, 32)).astype(np.float32)
    h = x.T @ x / len(x)
    out = str(tmp / "ckpt")
    ck.atomic_write_bytes(os.path.join(out, ck.JOB_FILE), ck.json_bytes({"format_version": ck.FORMAT_VERSION,
                                                                         "job": "security-test"}))
    for i in range(cfg.num_hidden_layers):
        pre = layer_prefix(i)
        quantized, protected, dense = {}, {}, {}
        for n in layer_shapes(cfg, i):
            if pre + n == PROTECTED:
                protected[pre + n] = flat[pre + n]
            elif pre + n in compressible(cfg):
                quantized[pre + n], _ = dec.decompose(flat[pre + n], h, BUDGETS.get(n, DEFAULT), key=7)
            else:
                dense[pre + n] = flat[pre + n]
        ck.write_layer(out, i, dense=dense, protected=protected, quantized=quantized,
                       matrices={n: {"test": True} for n in quantized}, job_digest="security-test")
    ck.atomic_write_bytes(os.path.join(out, "progress.json"), ck.json_bytes({"layers": {}}))
    ck.write_globals(out, {n: flat[n] for n in ck.GLOBAL_NAMES})
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ck.copy_tokenizer(str(tok), out) == ["tokenizer.json", "tokenizer_config.json"]
    ck.write_config(out, {"model_config": cfg.to_hf_dict(), "source_fingerprint": fingerprint(path)})
    cfg2, loaded = ck.load_compressed(out, source=path)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7)))
    logits = np.asarray(forward(loaded, cfg2, tokens))
    assert np.all(np.isfinite(logits))
    files = sorted(os.path.relpath(os.path.join(r, f), out).replace(os.sep, "/")
                   for r, _, fs in os.walk(out) for f in fs)
    return {"out": out, "cfg": cfg, "files": files, "loaded": loaded, "logits": logits, "tokens": tokens}


def copy_of(ckpt, where) -> str:
    d = os.path.join(str(where), "copy")
    shutil.copytree(ckpt["out"], d)
    return d


def read_st(path):
    with safe_open(path, framework="numpy") as f:
        md = f.metadata() or {}
        return json.loads(md["caldera"]), {k: f.get_tensor(k) for k in f.keys()}


def write_st(path, meta, tensors):
    save_file(tensors, path, metadata={"caldera": json.dumps(meta, sort_keys=True)})


def rewrite(path, edit):
    """edit(meta, tensors) in place, then the file is written back."""
    meta, tensors = read_st(path)
    edit(meta, tensors)
    write_st(path, meta, tensors)


def rehash(d, **changes):
    """What anyone who can write the directory can do: record every file's new sha256 and the
    manifest's own digest (plus `changes` to the manifest)."""
    p = os.path.join(d, ck.CONFIG_FILE)
    m = json.load(open(p))
    m.update(changes)
    m["files"] = {rel: ck.file_sha256(os.path.join(d, rel)) for rel in m["files"]}
    if m.get("format_version", 2) >= 2:
        m[ck.MANIFEST_DIGEST] = ck.manifest_digest(m)
    else:
        m.pop(ck.MANIFEST_DIGEST, None)
    with open(p, "wb") as f:
        f.write(ck.json_bytes(m))


def raw_safetensors(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


# ------------------------------------------------------------------ 1. a checkpoint never runs code
def test_new_checkpoints_store_kinds_not_class_paths(ckpt):
    m = ck.compressed_info(ckpt["out"])
    assert m["format_version"] == ck.FORMAT_VERSION == 2 and m[ck.MANIFEST_DIGEST] == ck.manifest_digest(m)
    assert set(ck.leaf_classes()) == set(ck.LEAF_LAYOUTS) == set(ck.HISTORIC_CLASS_PATHS.values())
    kinds = set()

    def walk(x):
        if isinstance(x, dict):
            assert "__class__" not in x
            if "__kind__" in x:
                kinds.add(x["__kind__"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for rel in (L0, L1):
        walk(read_st(os.path.join(ckpt["out"], rel))[0]["quantized"])
    assert kinds == {"qlr_weight"}          # what the writer emits for a model today


def test_every_kind_round_trips_and_unknown_classes_are_not_stored():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    qm = quantize(w, QuantSpec("uniform", 4, 8, False))
    pm = packing.pack(qm)
    dense = packing.pack_dense(w)
    qlr = QLRWeight.from_parts(qm, l=w[:, :2], r=w[:2, :], scale=0.5, signs_in=np.sign(rng.standard_normal(16)))
    q4 = quantize(w, QuantSpec("fp4", 4))                 # a format with a per-tensor scale slot
    for obj in (qlr, pm, dense, qm, (pm, [dense]), q4, packing.pack(q4)):
        tensors = {}
        spec = ck.encode_leaf(obj, "m::", tensors)
        assert "__class__" not in json.dumps(spec)
        back = ck.decode_leaf(json.loads(json.dumps(spec)), tensors, "file: m")
        assert jax.tree.structure(back) == jax.tree.structure(obj)
        for a, b in zip(jax.tree.leaves(obj), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match=r"m::: cannot store a caldera_jax\.formats\.quant\.QuantSpec"):
        ck.encode_leaf(QuantSpec(), "m::", {})


def _fields_payload(cls_path, marker, victim):
    return {
        "os:system": {"command": f"touch {marker}"},
        "subprocess:run": {"args": {"__list__": ["touch", marker]}},
        "caldera_jax.checkpoints_io.compressed:clear_dir": {"path": victim},
        "caldera_jax.checkpoints_io.compressed:os.system": {"command": f"touch {marker}"},
        "caldera_jax.checkpoints_io.compressed:shutil.rmtree": {"path": victim},
    }[cls_path]


ATTACKS = [
    ("__class__", "os:system"),
    ("__class__", "subprocess:run"),
    ("__class__", "caldera_jax.checkpoints_io.compressed:clear_dir"),
    # these passed the old "module starts with caldera_jax." check and reached os / shutil
    ("__class__", "caldera_jax.checkpoints_io.compressed:os.system"),
    ("__class__", "caldera_jax.checkpoints_io.compressed:shutil.rmtree"),
    ("__kind__", "os:system"),
]


@pytest.mark.parametrize("tag,cls_path", ATTACKS)
@pytest.mark.parametrize("nested", [False, True], ids=["leaf", "nested"])
def test_crafted_class_never_runs_code(ckpt, tmp_path, monkeypatch, tag, cls_path, nested):
    """A layer file whose object names a callable (with the manifest's sha256 and own digest
    recomputed): CheckpointError naming the file, the matrix and the value; nothing runs, and no
    object of the layer is built (the check precedes construction)."""
    d = copy_of(ckpt, tmp_path)
    marker, victim = str(tmp_path / "marker"), str(tmp_path / "victim")
    os.mkdir(victim)
    payload = {tag: cls_path, "fields": _fields_payload(cls_path if tag == "__class__" else "os:system",
                                                          marker, victim)}
    target = "model.layers.0.self_attn.v_proj.weight"          # sorts after o_proj, q_proj, mlp.*

    def edit(meta, tensors):
        if nested:     # deep inside an otherwise valid packed matrix
            fields = {k: None for k in ("codes", "codes2", "scales", "zeros")}
            tensors[target + "::codes"] = np.zeros((32, 4), np.uint32)
            fields["codes"] = {"__tensor__": target + "::codes"}
            fields["fmt"] = payload
            meta["quantized"][target] = {"__kind__": "packed_matrix", "fields": fields}
        else:
            meta["quantized"][target] = payload
        for k in [k for k in tensors if k.startswith(target + "::") and not k.endswith("::codes")]:
            del tensors[k]

    rewrite(os.path.join(d, L0), edit)
    rehash(d)
    built = []
    orig = QLRWeight.from_arrays.__func__
    monkeypatch.setattr(QLRWeight, "from_arrays",
                        classmethod(lambda cls, *a, **k: built.append(1) or orig(cls, *a, **k)))
    shown = cls_path.replace(".", r"\.")
    with pytest.raises(CheckpointError, match=rf"layer-00000\.safetensors: {target.replace('.', '[.]')}.*{shown}"):
        ck.load_compressed(d)
    assert not os.path.exists(marker) and os.path.isdir(victim)
    assert built == []


@pytest.mark.parametrize("bad", [
    "caldera_jax.caldera.qlr_weight:QLRWeight ",                 # not exactly a historic path
    "caldera_jax.caldera.qlr_weight:QLRWeight.from_arrays",
    "caldera_jax.caldera.qlr_weight:jax.numpy.save",
    "caldera_jax.caldera.qlr_weight.QLRWeight",
])
def test_near_miss_historic_paths_refused(ckpt, tmp_path, bad):
    d = copy_of(ckpt, tmp_path)
    target = "model.layers.1.mlp.up_proj.weight"
    rewrite(os.path.join(d, L1), lambda meta, t: meta["quantized"][target].update(
        {"__class__": bad}) or meta["quantized"][target].pop("__kind__"))
    rehash(d)
    with pytest.raises(CheckpointError, match=rf"layer-00001\.safetensors: {target}: refusing to build class"):
        ck.load_compressed(d)


def test_version1_checkpoint_with_historic_class_paths_loads(ckpt, tmp_path):
    """A version-1 checkpoint (class paths, no manifest digest) loads to the same parameters."""
    d = copy_of(ckpt, tmp_path)
    paths = {k: p for p, k in ck.HISTORIC_CLASS_PATHS.items()}

    def to_v1(x):
        if isinstance(x, dict):
            return {("__class__" if k == "__kind__" else k): (paths[v] if k == "__kind__" else to_v1(v))
                    for k, v in x.items()}
        return [to_v1(v) for v in x] if isinstance(x, list) else x

    for rel in (L0, L1):
        rewrite(os.path.join(d, rel), lambda meta, t: meta.update(quantized=to_v1(meta["quantized"])))
    rehash(d, format_version=1)
    m = json.load(open(os.path.join(d, ck.CONFIG_FILE)))
    assert m["format_version"] == 1 and ck.MANIFEST_DIGEST not in m
    assert "caldera_jax.caldera.qlr_weight:QLRWeight" in json.dumps(read_st(os.path.join(d, L0))[0])
    _, loaded = ck.load_compressed(d)
    np.testing.assert_array_equal(np.asarray(forward(loaded, ckpt["cfg"], ckpt["tokens"])), ckpt["logits"])
    # version 2 requires the manifest digest
    rehash(d, format_version=2)
    p = os.path.join(d, ck.CONFIG_FILE)
    m = json.load(open(p))
    del m[ck.MANIFEST_DIGEST]
    open(p, "wb").write(ck.json_bytes(m))
    with pytest.raises(CheckpointError, match=rf"caldera_config\.json: no {ck.MANIFEST_DIGEST}"):
        ck.load_compressed(d)


def test_manifest_edits_refused(ckpt, tmp_path):
    d = copy_of(ckpt, tmp_path)
    p = os.path.join(d, ck.CONFIG_FILE)
    raw = open(p, "rb").read()
    for new in (raw.replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 1e-05'),
                raw.replace(b'\n "files"', b'\n\t"files"'),          # same JSON, other bytes
                raw.replace(b'"format_version": 2', b'"format_version": 1')):
        assert new != raw
        open(p, "wb").write(new)
        with pytest.raises(CheckpointError,
                           match=rf"caldera_config\.json: its content differs from its {ck.MANIFEST_DIGEST}"):
            ck.load_compressed(d)
    m = json.loads(raw)
    m["files"]["../../etc/passwd"] = "0" * 64
    m[ck.MANIFEST_DIGEST] = ck.manifest_digest(m)
    open(p, "wb").write(ck.json_bytes(m))
    with pytest.raises(CheckpointError, match=r"file name \.\./\.\./etc/passwd is not a plain path"):
        ck.load_compressed(d)


# ------------------------------------------------------------------ 2. completeness
@pytest.mark.parametrize("rel,name", [
    (ck.GLOBALS_FILE, "model.norm.weight"),
    (ck.GLOBALS_FILE, "lm_head.weight"),
    (ck.GLOBALS_FILE, "model.embed_tokens.weight"),
    (L1, "model.layers.1.mlp.up_proj.weight"),            # quantized
    (L0, "model.layers.0.input_layernorm.weight"),        # dense
    (L1, PROTECTED),                                      # protected (bf16)
])
def test_missing_tensor_refused_at_load(ckpt, tmp_path, rel, name):
    d = copy_of(ckpt, tmp_path)

    def edit(meta, tensors):
        for k in [k for k in tensors if k == name or k.startswith(name + ck.SEP)]:
            del tensors[k]
        for key in ("dense", "protected", "globals"):
            if key in meta:
                meta[key] = [n for n in meta[key] if n != name]
        meta.get("quantized", {}).pop(name, None)

    rewrite(os.path.join(d, rel), edit)
    rehash(d)
    with pytest.raises(CheckpointError, match=rf"{rel.split('/')[-1]}: missing tensor '{name}'"):
        ck.load_compressed(d)


def test_tied_model_needs_no_lm_head_and_extra_tensors_refused(ckpt, tmp_path):
    d = copy_of(ckpt, tmp_path)
    g = os.path.join(d, ck.GLOBALS_FILE)
    rewrite(g, lambda meta, t: t.pop("lm_head.weight"))
    mc = dict(json.load(open(os.path.join(d, ck.CONFIG_FILE)))["model_config"], tie_word_embeddings=True)
    rehash(d, model_config=mc)
    cfg, params = ck.load_compressed(d)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    # a global that is not one overrides nothing: refused
    rewrite(g, lambda meta, t: t.update({"model.layers.0.input_layernorm.weight": np.ones(32, np.float32)}))
    rehash(d)
    with pytest.raises(CheckpointError, match=r"globals\.safetensors: tensor 'model\.layers\.0\.input_layernorm"
                                              r"\.weight' is not one of the global tensors"):
        ck.load_compressed(d)


@pytest.mark.parametrize("rel,name,value,msg", [
    (ck.GLOBALS_FILE, "model.norm.weight", np.ones(33, np.float32), r"has shape \(33,\), expected \(32,\)"),
    (L0, "model.layers.0.post_attention_layernorm.weight", np.ones((32, 1), np.float32), r"has shape \(32, 1\)"),
])
def test_wrong_shape_refused(ckpt, tmp_path, rel, name, value, msg):
    d = copy_of(ckpt, tmp_path)
    rewrite(os.path.join(d, rel), lambda meta, t: t.update({name: value}))
    rehash(d)
    with pytest.raises(CheckpointError, match=rf"{rel.split('/')[-1]}: tensor '{name}' {msg}"):
        ck.load_compressed(d)


def test_config_with_more_layers_than_files_refused(ckpt, tmp_path):
    d = copy_of(ckpt, tmp_path)
    mc = dict(json.load(open(os.path.join(d, ck.CONFIG_FILE)))["model_config"], num_hidden_layers=3)
    rehash(d, model_config=mc)
    with pytest.raises(CheckpointError, match=r"layer-00002\.safetensors: not listed in caldera_config\.json"):
        ck.load_compressed(d)
    with pytest.raises(CheckpointError, match=r"layer-00002\.safetensors: missing"):
        ck.load_compressed(d, verify_files=False)


# ------------------------------------------------------------------ 3. malformed tensors name the file
Q = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def _retype(name, value):
    return lambda meta, t: t.update({name: value})


MALFORMED = {
    "int-norm": (_retype(NORM, np.ones(32, np.int32)), rf"tensor '{NORM}' has dtype int32, expected a float"),
    "complex-norm": (_retype(NORM, np.ones(32, np.complex64)), r"has dtype complex64"),
    "float-codes": (_retype(Q + "::q.codes", np.zeros((32, 4), np.float32)),
                    r"q\.codes: float32\[32, 4\], expected uint32"),
    "u64-codes": (_retype(Q + "::q.codes", np.zeros((32, 4), np.uint64)), r"has dtype uint64, not one a quantized"),
    "short-codes": (_retype(Q + "::q.codes", np.zeros((32, 3), np.uint32)),
                    r"q\.codes: uint32\[32, 3\], expected uint32\[32, 4\]"),
    "f64-scale": (_retype(Q + "::scale", np.ones(1, np.float64)), r"has dtype float64, not one a quantized"),
    "i32-scale": (_retype(Q + "::scale", np.ones(1, np.int32)), r"scale is missing or not float32"),
    "signs": (_retype(Q + "::signs_in", np.zeros(5, np.uint8)), r"signs_in is uint8\[5\], expected uint8\[4\]"),
    "stray": (_retype("model.layers.0.extra", np.zeros(3, np.float32)),
              r"\['model\.layers\.0\.extra'\] are not referenced"),
    "missing-ref": (lambda meta, t: t.pop(Q + "::q.scales"), rf"{Q} \(q\.scales\): missing tensor"),
    "bad-meta": (lambda meta, t: meta["quantized"][Q]["meta"].update(q="uniform"), r"cannot rebuild the qlr_weight"),
    "bad-format": (lambda meta, t: meta["quantized"][Q]["meta"]["q"].update(bits=5), r"not a valid packed format"),
    "unknown-marker": (lambda meta, t: meta["quantized"].update({Q: {"__pickle__": "x"}}), r"unreadable structure"),
    "not-lists": (lambda meta, t: meta.update(dense="x"), r"lacks its dense / protected / quantized"),
    "wrong-layer": (lambda meta, t: meta.update(layer=1), r"holds layer 1, expected layer 0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_layer_names_the_file(ckpt, tmp_path, case):
    edit, msg = MALFORMED[case]
    d = copy_of(ckpt, tmp_path)
    rewrite(os.path.join(d, L0), edit)
    rehash(d)
    with pytest.raises(CheckpointError, match=rf"layer-00000\.safetensors.*{msg}"):
        ck.load_compressed(d)


@pytest.mark.parametrize("dtype,msg", [("F8_E4M3", "not a readable safetensors file"),
                                       ("OBJECT", "not a readable safetensors file"),
                                       ("I64", "has dtype int64, expected a float")])
@pytest.mark.parametrize("rel", [L0, ck.GLOBALS_FILE])
def test_unreadable_dtypes_name_the_file(ckpt, tmp_path, dtype, msg, rel):
    """Tensors numpy cannot hold (float8 without ml_dtypes' names in numpy: AttributeError inside
    safetensors) or an unknown dtype in the header: CheckpointError naming the file, never the
    library's own exception."""
    d = copy_of(ckpt, tmp_path)
    p = os.path.join(d, rel)
    meta, tensors = read_st(p)
    name = NORM if rel == L0 else "model.norm.weight"
    header, data, off = {"__metadata__": {"caldera": json.dumps(meta, sort_keys=True)}}, b"", 0
    for k, a in sorted(tensors.items()):
        b = a.tobytes()
        dt = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint8": "U8", "uint16": "U16",
              "uint32": "U32"}[a.dtype.name]
        shape = list(a.shape)
        if k == name:
            dt, shape = dtype, [len(b) // {"F8_E4M3": 1, "OBJECT": 4, "I64": 8}[dtype]]
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        data, off = data + b, off + len(b)
    raw_safetensors(p, header, data)
    rehash(d)
    with pytest.raises(CheckpointError, match=rf"{rel.split('/')[-1]}: .*{msg}"):
        ck.load_compressed(d)


def test_truncated_and_garbage_files_name_the_file(ckpt, tmp_path):
    d = copy_of(ckpt, tmp_path)
    for rel, data in ((L1, open(os.path.join(d, L1), "rb").read()[:1000]), (ck.GLOBALS_FILE, b"\xff" * 64)):
        p = os.path.join(d, rel)
        keep = open(p, "rb").read()
        open(p, "wb").write(data)
        with pytest.raises(CheckpointError, match=rf"{rel.split('/')[-1]}: not a readable safetensors file"):
            ck.load_compressed(d, verify_files=False)
        open(p, "wb").write(keep)


# ------------------------------------------------------------------ 4. random corruption (property)
CORRUPTION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=8)),
)


def corrupt(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        off = op[1] % (len(b) + 1)
        if op[0] == "flip" and off < len(b):
            b[off] ^= 1 << op[2]
        elif op[0] == "overwrite":
            b[off:off + len(op[2])] = op[2]
        elif op[0] == "truncate":
            del b[off:]
        elif op[0] == "insert":
            b[off:off] = op[2]
    return bytes(b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_of_any_file_is_refused(ckpt, data):
    """Any file of the checkpoint, corrupted at random (bit flips, overwrites, truncation,
    insertion): load_compressed raises CheckpointError, or (a no-op corruption) loads the
    unchanged bytes. No file is excluded: write_config records the sha256 of every file the job
    wrote (job.json, progress.json and the tokenizer files too, though loading does not read
    them), and caldera_config.json carries the sha256 of its own canonical content."""
    rel = data.draw(st.sampled_from(ckpt["files"]), label="file")
    ops = data.draw(st.lists(CORRUPTION, min_size=1, max_size=3), label="corruption")
    d = tempfile.mkdtemp(prefix="corrupt-")
    try:
        out = os.path.join(d, "c")
        shutil.copytree(ckpt["out"], out)
        p = os.path.join(out, rel)
        before = open(p, "rb").read()
        after = corrupt(before, ops)
        open(p, "wb").write(after)
        try:
            ck.load_compressed(out)
        except CheckpointError:
            return
        assert after == before, f"{rel}: changed bytes loaded silently ({ops})"
    finally:
        shutil.rmtree(d)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_without_digests_raises_only_checkpoint_errors(ckpt, data):
    """The same with verify_files=False (no sha256 to catch it): a corrupted layer or globals file
    is a CheckpointError naming the file, or (the corruption hit tensor data only) it loads; never
    another exception type. Offsets favour the header, where the structure is."""
    rel = data.draw(st.sampled_from([L0, L1, ck.GLOBALS_FILE]), label="file")
    ops = data.draw(st.lists(CORRUPTION, min_size=1, max_size=2), label="corruption")
    d = tempfile.mkdtemp(prefix="corrupt-")
    try:
        out = os.path.join(d, "c")
        shutil.copytree(ckpt["out"], out)
        p = os.path.join(out, rel)
        before = open(p, "rb").read()
        header_end = 8 + int.from_bytes(before[:8], "little")
        if data.draw(st.booleans(), label="in header"):
            ops = [(op[0], op[1] % header_end, *op[2:]) for op in ops]
        open(p, "wb").write(corrupt(before, ops))
        try:
            ck.load_compressed(out, verify_files=False)
        except CheckpointError as e:
            assert os.path.basename(rel) in str(e)
    finally:
        shutil.rmtree(d)
