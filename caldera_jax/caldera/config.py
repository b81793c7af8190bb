"""The compression job's config: a YAML file of defaults, per-name overrides and protected layers.

    defaults:                      # every MatrixBudget field (caldera_jax/caldera/spec.py) + calibration
      quantizer: e8p
      b_q: 2
      b_l: 4
      b_r: 4
      rank: 64
      calib_samples: 64            # calibration sequences
      calib_seq_len: 256           # tokens per sequence
      calib_batch_size: 8          # sequences per forward step
      calib_propagate: original    # hidden states through the original layers, or "compressed"
    pattern_overrides:             # HF parameter-name globs (fnmatch) -> MatrixBudget fields
      "model.layers.2[0-9].mlp.down_proj.weight": {rank: 128}
      "model.layers.0.*": {b_q: 4}
    protect:                       # globs of matrices kept in bf16 (not compressed)
      - "model.layers.29.*"
    finetune:                      # optional: fine-tune after decomposition (caldera/finetune.py's
      steps: 150                   # FinetuneConfig fields); experiments.compress then writes the
      lr: 1.0e-3                   # fine-tuned checkpoint to <out>-finetuned. Not part of the
                                   # compression's identity (changing it never redoes a layer).

Precedence (lowest to highest): `defaults`, then every `pattern_overrides` entry whose glob matches
the matrix name, in file order (a later matching entry overrides the fields it sets; fields it does
not set keep the earlier value), then `protect` (a protected matrix is never compressed, whatever
the overrides say). Globs use fnmatch on the full canonical name, where `*` also matches dots.

Which matrices: every linear weight of the decoder layers (q/k/v/o, gate/up/down, and the MoE
experts' gate/up/down). MoE experts are matched by their stacked name
`model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight`: all experts of one projection share a
budget (they are decomposed as one batched stack). The MoE router, embeddings, norms, biases and
the LM head are never compressed.

Everything is checked before any work starts (`JobConfig.check(model_cfg)`): unknown keys, wrong
types, bit widths the quantizer does not support, ranks above min(m, n) of a matched matrix, and
globs that match no compressible matrix are errors naming the YAML file, the key and the matrix.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Any

import yaml

from caldera_jax import families
from caldera_jax.caldera.spec import BudgetError, MatrixBudget
from caldera_jax.config import ModelConfig
from caldera_jax.params import param_shapes


class JobConfigError(ValueError):
    """A job config that cannot be used; the message names the YAML file, the key and the matrix."""


BUDGET_FIELDS = {f.name: f for f in dataclasses.fields(MatrixBudget)}
_PY_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    samples: int = 64              # calibration sequences
    seq_len: int = 256             # tokens per sequence (longer documents are cut, shorter padded)
    batch_size: int = 8            # sequences per forward step (per data-parallel group)
    propagate: str = "original"    # "original": layer i's inputs come from the original layers < i;
    #                                "compressed": from the already-compressed ones


CALIB_KEYS = {"calib_samples": "samples", "calib_seq_len": "seq_len",
              "calib_batch_size": "batch_size", "calib_propagate": "propagate"}
TOP_KEYS = ("defaults", "pattern_overrides", "protect", "finetune")


# ------------------------------------------------------------------ which matrices
# every family's decoder-layer linears (caldera_jax.families: Family.linears)
_LINEAR = re.compile(r"^model\.layers\.(\d+)\.("
                     + "|".join(map(re.escape, families.linears())) + r")\.weight$")


def is_compressible(name: str) -> bool:
    """A decoder-layer linear weight (not the router, embeddings, norms, biases or LM head)."""
    return _LINEAR.match(name) is not None


def compressible(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every compressible matrix of the model -> shape ([m, n], or [E, m, n] for stacked experts)."""
    return {k: v for k, v in param_shapes(cfg).items() if is_compressible(k)}


def layer_of(name: str) -> int:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if not m:
        raise ValueError(f"'{name}' is not a decoder-layer parameter")
    return int(m[1])


# ------------------------------------------------------------------ YAML with duplicate-key check
class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise JobConfigError(f"{loader.name}: line {key_node.start_mark.line + 1}: duplicate key "
                                 f"'{key}' (first at line {seen[key]}); YAML would silently keep the last")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


# ------------------------------------------------------------------ the config
@dataclasses.dataclass(frozen=True)
class JobConfig:
    defaults: MatrixBudget = MatrixBudget()
    calibration: CalibrationSpec = CalibrationSpec()
    # (glob, ((field, value), ...)) in file order
    pattern_overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    protect: tuple[str, ...] = ()
    source: str = "<config>"     # the YAML file (for messages); not part of the job's identity
    finetune: tuple[tuple[str, Any], ...] | None = None   # FinetuneConfig fields, or None (no fine-tuning)

    # -------------------------------------------------------------- reading
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "JobConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise JobConfigError(f"{path}: config file not found")
        with open(path, encoding="utf-8") as f:
            try:
                d = yaml.load(f, Loader=_StrictLoader)
            except yaml.YAMLError as e:
                raise JobConfigError(f"{path}: not valid YAML ({e})") from e
        return cls.from_dict(d if d is not None else {}, source=path)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<config>") -> "JobConfig":
        """Parses and checks everything that does not depend on the model."""
        if not isinstance(d, dict):
            raise JobConfigError(f"{source}: the top level must be a mapping with keys {TOP_KEYS}")
        unknown = [k for k in d if k not in TOP_KEYS]
        if unknown:
            raise JobConfigError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))} "
                                 f"(allowed: {', '.join(TOP_KEYS)})")
        defaults = d.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise JobConfigError(f"{source}: 'defaults' must be a mapping")
        budget_kw, calib_kw = {}, {}
        for k, v in defaults.items():
            if k in CALIB_KEYS:
                calib_kw[CALIB_KEYS[k]] = _typed(source, f"defaults.{k}", v,
                                                 "str" if k == "calib_propagate" else "int")
            elif k in BUDGET_FIELDS:
                budget_kw[k] = _typed(source, f"defaults.{k}", v, BUDGET_FIELDS[k].type)
            else:
                raise JobConfigError(f"{source}: unknown key 'defaults.{k}' (allowed: "
                                     f"{', '.join(list(BUDGET_FIELDS) + list(CALIB_KEYS))})")
        base = MatrixBudget(**budget_kw)
        _validate(base, None, f"{source}: defaults")
        calib = CalibrationSpec(**calib_kw)
        for f, ok, why in (("samples", calib.samples >= 1, ">= 1"), ("seq_len", calib.seq_len >= 2, ">= 2"),
                           ("batch_size", calib.batch_size >= 1, ">= 1"),
                           ("propagate", calib.propagate in ("original", "compressed"),
                            "'original' or 'compressed'")):
            if not ok:
                key = next(k for k, v in CALIB_KEYS.items() if v == f)
                raise JobConfigError(f"{source}: defaults.{key}={getattr(calib, f)!r} must be {why}")

        po = d.get("pattern_overrides") or {}
        if not isinstance(po, dict):
            raise JobConfigError(f"{source}: 'pattern_overrides' must be a mapping of glob -> fields")
        overrides = []
        for glob, fields in po.items():
            where = f"pattern_overrides['{glob}']"
            if not isinstance(glob, str):
                raise JobConfigError(f"{source}: {where}: the glob must be a string")
            if not isinstance(fields, dict) or not fields:
                raise JobConfigError(f"{source}: {where} must be a non-empty mapping of MatrixBudget fields")
            items = []
            for k, v in fields.items():
                if k not in BUDGET_FIELDS:
                    hint = " (calibration settings go in 'defaults')" if k in CALIB_KEYS else ""
                    raise JobConfigError(f"{source}: unknown key '{where}.{k}'{hint} "
                                         f"(allowed: {', '.join(BUDGET_FIELDS)})")
                items.append((k, _typed(source, f"{where}.{k}", v, BUDGET_FIELDS[k].type)))
            overrides.append((glob, tuple(items)))

        protect = d.get("protect") or []
        if isinstance(protect, str):
            protect = [protect]
        if not isinstance(protect, list) or not all(isinstance(p, str) for p in protect):
            raise JobConfigError(f"{source}: 'protect' must be a list of glob strings")
        ft = d.get("finetune")
        if ft is not None:
            from caldera_jax.caldera.finetune import FinetuneConfig, FinetuneError
            if not isinstance(ft, dict):
                raise JobConfigError(f"{source}: 'finetune' must be a mapping of fine-tuning settings")
            try:
                FinetuneConfig.from_dict(ft)
            except (FinetuneError, TypeError) as e:
                raise JobConfigError(f"{source}: {e}") from None
            ft = tuple(sorted(ft.items()))
        return cls(base, calib, tuple(overrides), tuple(protect), source, ft)

    def finetune_config(self):
        """The FinetuneConfig of the `finetune:` section, or None."""
        from caldera_jax.caldera.finetune import FinetuneConfig
        return None if self.finetune is None else FinetuneConfig.from_dict(dict(self.finetune))

    # -------------------------------------------------------------- per matrix
    def is_protected(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.protect)

    def _merged(self, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        """(MatrixBudget kwargs, field -> the key that set it)."""
        kw = dataclasses.asdict(self.defaults)
        origin = {k: "defaults" for k in kw}
        for glob, items in self.pattern_overrides:
            if fnmatch.fnmatchcase(name, glob):
                for k, v in items:
                    kw[k], origin[k] = v, f"pattern_overrides['{glob}']"
        return kw, origin

    def budget_for(self, name: str, shape: tuple[int, ...]) -> MatrixBudget | None:
        """The matrix's budget after overrides, or None when protected (kept in bf16).
        shape: [m, n] or [E, m, n] (stacked experts: checked per expert matrix)."""
        if self.is_protected(name):
            return None
        kw, origin = self._merged(name)
        b = _validate(MatrixBudget(**kw), tuple(shape[-2:]), f"{self.source}", origin, name)
        if b.incoherence:
            from caldera_jax.formats import incoherence
            for side, k in zip(("m (rows)", "n (columns)"), shape[-2:]):
                if not incoherence.is_supported(int(k)):
                    raise JobConfigError(
                        f"{self.source}: matrix {name}: incoherence=True (set by {origin['incoherence']}) "
                        f"but its {side} = {k} has no Hadamard transform (sizes 2^k or 2^k*K, K in "
                        f"{incoherence.BASES}); add a pattern_overrides entry with incoherence: false")
        return b

    def check(self, model_cfg: ModelConfig) -> dict[str, MatrixBudget | None]:
        """Validates the config against a model; returns {matrix name: budget or None (protected)}
        for every compressible matrix, in model order. Raises JobConfigError before any work."""
        mats = compressible(model_cfg)
        for kind, globs in (("pattern_overrides", [g for g, _ in self.pattern_overrides]),
                            ("protect", list(self.protect))):
            for g in globs:
                if not any(fnmatch.fnmatchcase(n, g) for n in mats):
                    example = next(iter(mats), "")
                    raise JobConfigError(
                        f"{self.source}: {kind}['{g}'] matches no compressible matrix of this "
                        f"{model_cfg.model_type} model ({model_cfg.num_hidden_layers} layers; names look "
                        f"like '{example}'); fix or remove the glob")
        return {n: self.budget_for(n, s) for n, s in mats.items()}

    # -------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        """The effective config of the compression as YAML-shaped plain data (every default filled
        in; without the `finetune:` section, which a fine-tuning job records itself)."""
        d = dataclasses.asdict(self.defaults)
        d.update({k: getattr(self.calibration, v) for k, v in CALIB_KEYS.items()})
        return {"defaults": d,
                "pattern_overrides": {g: dict(items) for g, items in self.pattern_overrides},
                "protect": list(self.protect)}

    def digest(self) -> str:
        import hashlib
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _typed(source: str, key: str, v: Any, typ: str) -> Any:
    want = _PY_TYPES.get(str(typ).split("|")[0].strip(), None)
    if want is None:
        return v
    ok = (isinstance(v, bool) if want is bool else
          isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
          isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
    if not ok:
        raise JobConfigError(f"{source}: {key}={v!r} must be {want.__name__}")
    return float(v) if want is float else v


_FIELD_IN_MSG = re.compile(r": (\w+)=")


def _validate(b: MatrixBudget, shape, source: str, origin: dict[str, str] | None = None,
              name: str | None = None) -> MatrixBudget:
    where = source if name is None else f"{source}: matrix {name}"
    try:
        return b.validate(shape, where=where)
    except BudgetError as e:
        msg = str(e)
        if origin is not None:
            m = _FIELD_IN_MSG.search(msg[len(where):]) if msg.startswith(where) else None
            if m and m[1] in origin:
                msg = f"{msg} (set by {origin[m[1]]})"
        raise JobConfigError(msg) from None


def load_job_config(path: str | os.PathLike, model_cfg: ModelConfig | None = None) -> JobConfig:
    """Reads a YAML job config; with model_cfg also checks it against the model."""
    jc = JobConfig.from_yaml(path)
    if model_cfg is not None:
        jc.check(model_cfg)
    return jc
