"""A compression job's output directory: one job per directory, resume, and --overwrite that
deletes only what a job of ours wrote.

    with JobDir(out) as d:                          # exclusive flock on <out>/.lock (kill -9 frees it)
        digest, done = d.prepare(identity, overwrite=False)   # {layer: sha256 recorded at write time}
        ...
        path = d.write_layer(i, dense=..., protected=..., quantized=..., matrices=...)
        d.verify_layers()                           # before the manifest hashes what is on disk

Files of a job: job.json (identity, written first), layers/layer-NNNNN.safetensors, progress.json
({"job_digest", "layers": {i: sha256 of the layer file as it was written}}), globals.safetensors,
tokenizer files, caldera_config.json (written last), report/. A finished layer is reused on resume
only when its file's sha256 equals the digest recorded when it was written.
"""
from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import sys
from typing import Any

from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.hf import TOKENIZER_FILES

LOCK_FILE = ".lock"
STAGING_DIR = ".staging"         # layer files being written (removed when a job starts or ends)
PROGRESS_FILE = "progress.json"
# What a job writes into --out, and so the only things --overwrite deletes.
OUR_FILES = (ck.CONFIG_FILE, ck.JOB_FILE, ck.GLOBALS_FILE, PROGRESS_FILE)
OUR_DIRS = {ck.LAYER_DIR: ("layer-*.safetensors",),
            "report": ("report.json", "metrics.jsonl", "error_by_layer.png", "ppl_by_tokens.png")}
# Directories a job of ours creates whole (a fine-tuning job's training state): removed whole.
OUR_TREES = ("finetune",)
IDENTITY_KEYS = {"job_config_digest", "code_digest", "source_digest"}


class JobError(RuntimeError):
    """A job that cannot run as asked (bad mesh, output directory of another job, ...)."""


def check_out_vs_model(out: str, model: str) -> None:
    """--out must not be the source model's directory nor inside it, nor the model file."""
    o, m = os.path.realpath(out), os.path.realpath(model)
    if os.path.isdir(m) and (o == m or o.startswith(m + os.sep)):
        raise JobError(f"{out}: --out is the source model's directory {model} or inside it; "
                       f"choose another --out (the source is never written to)")
    if o == m:
        raise JobError(f"{out}: --out is the source model file")


class JobDir:
    """The output directory of one job, locked for this process while the `with` block runs.
    OS errors (an existing file, no permission, a read-only filesystem) become one-line
    JobErrors naming the path; a refused directory is left without our .lock file."""

    def __init__(self, out: str):
        self.out = out
        self.digest: str | None = None
        self.done: dict[int, str] = {}
        self._fd: int | None = None
        self._created = False

    # ---------------------------------------------------------------- lock
    def __enter__(self) -> "JobDir":
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise JobError(f"{self.out}: --out exists and is not a directory")
        try:
            self._created = not os.path.exists(self.out)
            os.makedirs(self.out, exist_ok=True)
            fd = os.open(os.path.join(self.out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(f"{self.out}: cannot create the output directory or its lock "
                           f"({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobError(f"{self.out}: another compression job is running in this directory") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release(remove=False)

    def release(self, *, remove: bool) -> None:
        """Unlocks; remove=True also deletes the .lock file (and the directory when this run
        created it and it is empty): what a refused --out gets."""
        if self._fd is None:
            return
        if remove:
            try:
                os.remove(os.path.join(self.out, LOCK_FILE))
                if self._created and not os.listdir(self.out):
                    os.rmdir(self.out)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    # ---------------------------------------------------------------- identity and resume
    def prepare(self, identity: dict[str, Any], overwrite: bool) -> tuple[str, dict[int, str]]:
        """Creates (or resumes) the directory for `identity`; returns (job digest, {finished
        layer: sha256}). A different job of ours is refused unless overwrite (then only its files
        are deleted); a directory holding anything else is always refused."""
        identity = json.loads(json.dumps(identity))            # as it reads back from job.json
        self.digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        try:
            self._prepare(identity, overwrite)
        except JobError:
            self.release(remove=True)
            raise
        except OSError as e:
            self.release(remove=True)
            raise JobError(f"{e.filename or self.out}: cannot prepare the output directory "
                           f"({e.strerror or e})") from None
        self.done = self._verified_layers()
        self._write_progress()
        return self.digest, dict(self.done)

    def _prepare(self, identity: dict[str, Any], overwrite: bool) -> None:
        out, job_path = self.out, os.path.join(self.out, ck.JOB_FILE)
        layers_dir = os.path.join(out, ck.LAYER_DIR)
        if os.path.isdir(layers_dir) and not os.listdir(layers_dir) and not os.path.isfile(job_path):
            os.rmdir(layers_dir)                                # killed before job.json: a fresh start
        transient = lambda f: f in (LOCK_FILE, STAGING_DIR) or (f.startswith(".") and ".tmp-" in f)  # noqa: E731
        if [f for f in os.listdir(out) if not transient(f)]:
            old = _read_json(job_path)
            if old != identity:
                if not (isinstance(old, dict) and IDENTITY_KEYS <= old.keys()):
                    raise JobError(f"{out}: exists and is not a compression job's directory (no valid "
                                   f"{ck.JOB_FILE}); choose another --out (--overwrite only replaces "
                                   f"a job of ours, and deletes only the files it wrote)")
                if not overwrite:
                    what = "holds a different job (" + ", ".join(
                        k for k in identity if old.get(k) != identity[k]) + " differ)"
                    if old.get("code_digest") != identity["code_digest"]:
                        what += ("; code: the caldera_jax sources changed since this job started, and a "
                                 "checkpoint mixing layers from two versions is refused")
                    raise JobError(f"{out}: {what}; use another --out, or --overwrite to delete it")
                kept = delete_our_files(out)
                if kept:
                    print(f"--overwrite: kept {len(kept)} file(s) in {out} that are not ours: "
                          f"{', '.join(kept[:5])}", file=sys.stderr, flush=True)
        # the directory is ours (or empty) from here on
        ck.remove_stale_temps(out)                              # what a killed run was writing
        shutil.rmtree(os.path.join(out, STAGING_DIR), ignore_errors=True)
        if not os.path.isfile(job_path):
            ck.atomic_write_bytes(job_path, ck.json_bytes(identity))
        os.makedirs(layers_dir, exist_ok=True)

    def _verified_layers(self) -> dict[int, str]:
        """Layer files of this job whose bytes equal the digest recorded at write time; every
        other layer file (unreadable, another job's, damaged) is deleted, to be redone."""
        recorded = self._read_progress()
        layers_dir = os.path.join(self.out, ck.LAYER_DIR)
        done = {}
        for f in sorted(os.listdir(layers_dir)):
            if not (f.startswith("layer-") and f.endswith(".safetensors")):
                continue
            path = os.path.join(layers_dir, f)
            meta = ck.read_layer_meta(path)
            i = int(meta["layer"]) if meta is not None and meta.get("job_digest") == self.digest else None
            if i is not None and recorded.get(i) == ck.file_sha256(path):
                done[i] = recorded[i]
                continue
            if i is not None:
                print(f"{path}: differs from the digest recorded when it was written: redoing layer {i}",
                      file=sys.stderr, flush=True)
            os.remove(path)
        return done

    # ---------------------------------------------------------------- progress
    def _read_progress(self) -> dict[int, str]:
        prog = _read_json(os.path.join(self.out, PROGRESS_FILE))
        try:
            if prog.get("job_digest") != self.digest:
                return {}
            return {int(k): str(v) for k, v in prog["layers"].items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            return {}

    def _write_progress(self) -> None:
        ck.atomic_write_bytes(os.path.join(self.out, PROGRESS_FILE), ck.json_bytes(
            {"job_digest": self.digest, "layers": {str(k): v for k, v in sorted(self.done.items())}}))

    def write_layer(self, i: int, **layer) -> str:
        """Writes layer i's file (ck.write_layer's keywords) so that its digest is recorded before
        the file appears under its final name: staged in .staging/, hashed, the sha256 recorded in
        progress.json, then renamed into layers/. A kill at any moment leaves either no layer file
        (redone on resume) or one whose recorded digest matches. Returns the final path."""
        staged = ck.write_layer(os.path.join(self.out, STAGING_DIR), i, job_digest=self.digest, **layer)
        self.done[i] = ck.file_sha256(staged)
        self._write_progress()
        final = os.path.join(self.out, ck.layer_file(i))
        os.replace(staged, final)
        fsync_path(os.path.dirname(final))
        return final

    def verify_layers(self) -> None:
        """Every finished layer file still has the bytes it was written with (caldera_config.json
        hashes what is on disk, so this runs right before it); a changed one is removed."""
        shutil.rmtree(os.path.join(self.out, STAGING_DIR), ignore_errors=True)
        for i, sha in sorted(self.done.items()):
            path = os.path.join(self.out, ck.layer_file(i))
            if ck.file_sha256(path) != sha:
                os.remove(path)
                raise JobError(f"{path}: changed on disk after it was written (sha256 differs from "
                               f"{PROGRESS_FILE}); removed it: rerun the same command to redo layer {i}")


def _read_json(path: str) -> Any:
    """The file's JSON; None when absent, "unreadable" when it is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return "unreadable"


def delete_our_files(out: str) -> list[str]:
    """Deletes what a job of ours writes (OUR_FILES, OUR_DIRS' patterns, OUR_TREES, the copied
    tokenizer files, stale temporaries) and nothing else; returns what was left in place."""
    for f in OUR_FILES:
        p = os.path.join(out, f)
        if os.path.isfile(p):
            os.remove(p)
    for d in OUR_TREES:
        if os.path.isdir(os.path.join(out, d)):
            shutil.rmtree(os.path.join(out, d))
    for d, patterns in OUR_DIRS.items():
        p = os.path.join(out, d)
        if not os.path.isdir(p):
            continue
        for f in os.listdir(p):
            if any(fnmatch.fnmatch(f, pat) for pat in patterns) or f.startswith("."):
                os.remove(os.path.join(p, f))
        if not os.listdir(p):
            os.rmdir(p)
    for f in os.listdir(out):
        if os.path.isfile(os.path.join(out, f)) and any(fnmatch.fnmatch(f, p) for p in TOKENIZER_FILES):
            os.remove(os.path.join(out, f))
    shutil.rmtree(os.path.join(out, STAGING_DIR), ignore_errors=True)   # layer files being written
    return sorted(f for f in os.listdir(out) if f != LOCK_FILE)
