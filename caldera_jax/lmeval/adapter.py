"""lm-eval's model interface over our JAX decoder, registered with lm-eval as `caldera-jax`.

    from caldera_jax.lmeval.adapter import register
    CalderaJaxLM = register()                    # lm-eval's registry now knows "caldera-jax"
    lm = CalderaJaxLM(path="runs/mine", source="hf_dir", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], task_manager=...)
    # or simple_evaluate(model="caldera-jax", model_args="path=runs/mine", batch_size=8, ...)

model_args: path (or pretrained): a HF directory, a .gguf file or a CALDERA checkpoint; source:
the model a checkpoint was built from (its fingerprint is checked); dtype: float32 | bfloat16;
batch_size: contexts (scoring; their choices ride along) or prompts (generation) per compiled
call (default 8); max_length: the context length (default the model's max_position_embeddings,
as lm-eval's hf model); max_gen_toks (default 256); decode_chunk: decode steps between
stop-sequence checks (default 16); add_bos_token: as lm-eval's hf model; codec: for an MoE
model, a fixed codec name (int8, int4, int2, fp8, ...) or a trained codec directory, run around the
expert-parallel all-to-all (caldera_jax/moe/codec_spec.py); router_mode: compressed |
uncompressed (default: the codec's own); scan_layers: score with identical consecutive layers
stacked into one compiled lax.scan (default true, without a codec; models/layer_stacks.py).
Tests may pass
model=EvalModel or (cfg, params) and tokenizer= instead of path.

Requests are scored and decoded as lm-eval's hf backend does them (same tokenization, left
truncation, empty-context prefix token, stop sequences and EOS), so the two compare; generation
is greedy only (a request with do_sample=True is refused). Each finished request is handed to
lm-eval's cache hook as soon as its batch ends, so with `use_cache` an interrupted run resumes.

lm_eval is imported when the class is first needed (lm_class()), not when this module is
imported: importing lm_eval sets HF_XET_HIGH_PERFORMANCE in the environment. The class is also
this module's attribute `CalderaJaxLM` (for lm-eval versions that load entry points).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from caldera_jax.lmeval import engine
from caldera_jax.lmeval.model import EvalModel, open_model
from caldera_jax.models.hooks import Hooks
from caldera_jax.models.layer_stacks import is_stacked, stack_layers, unstack_layers
from caldera_jax.moe.codec_spec import attach, load_codec

NAME = "caldera-jax"


def _int_arg(v: Any, default: int) -> int:
    """lm-eval passes batch sizes as int, "8", "auto" or "auto:4"; auto means the default."""
    if v is None or (isinstance(v, str) and v.startswith("auto")):
        return default
    return int(v)


@functools.cache
def lm_class() -> type:
    """The lm_eval.api.model.TemplateLM subclass (built once, on first use)."""
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from tqdm.auto import tqdm

    class CalderaJaxLM(TemplateLM):
        """lm-eval LM running caldera_jax's decoder (original weights or a CALDERA checkpoint)."""

        def __init__(self, path: str | None = None, source: str | None = None, dtype: str = "float32",
                     batch_size: Any = 8, max_length: int | None = None, max_gen_toks: int = 256,
                     decode_chunk: int = 16, add_bos_token: bool | None = None, pretrained: str | None = None,
                     model: Any = None, tokenizer: Any = None, codec: str | None = None,
                     router_mode: str | None = None, scan_layers: Any = True, **_ignored: Any):
            super().__init__()
            path = path or pretrained
            if model is None:
                if path is None:
                    raise ValueError(f"{NAME}: give model_args path=<HF dir | .gguf | compressed checkpoint>")
                model = open_model(path, source, dtype)
            elif isinstance(model, tuple):
                if tokenizer is None:
                    raise ValueError(f"{NAME}: model=(cfg, params) needs tokenizer=")
                model = EvalModel(model[0], model[1], tokenizer, {"kind": "memory", "dtype": dtype})
            self.cfg, self.tokenizer = model.cfg, model.tokenizer
            self.codec = load_codec(codec or "none", self.cfg)
            self.params, self.hooks = attach(self.codec, self.cfg, model.params, router_mode)
            self.scan_layers = str(scan_layers).lower() in ("true", "1", "yes") and self.hooks == Hooks()
            self.model = dataclasses.replace(model, params=None)       # one copy of the weights: self.params
            self.router_mode = None if self.codec.codec is None else (router_mode or self.codec.router_mode)
            self.add_bos_token = add_bos_token
            self._max_length = int(max_length or self.cfg.max_position_embeddings)
            self._max_gen_toks = int(max_gen_toks)
            self.buckets = engine.Buckets(batch=_int_arg(batch_size, 8), chunk=int(decode_chunk))
            eos = self.cfg.eos_token_id
            eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
            self.eos_ids = tuple(sorted(set(eos) | ({self.eot_token_id} if self.eot_token_id is not None else set())))
            pad = self.tokenizer.pad_token_id
            self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))

        def _params(self, stacked: bool):
            """The weights laid out for the work at hand: stacked layers (one compiled lax.scan)
            for scoring, where every call is compute-bound and new shapes keep coming; per-layer
            for KV-cache decoding, where a scan's per-layer weight slices cost ~15% per step on
            CPU. lm-eval sends each request type at once, so a run converts at most twice."""
            want = stacked and self.scan_layers
            if is_stacked(self.params) != want:
                self.params = (stack_layers if want else unstack_layers)(self.params, self.cfg, consume=True)
            return self.params

        # -------------------------------------------------------------- tokenizer (as lm-eval's hf model)
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            kw = ({"add_special_tokens": add_special_tokens} if add_special_tokens is not None
                  else {"add_special_tokens": self.add_bos_token} if self.add_bos_token is not None else {})
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                kw["add_special_tokens"] = False
            ids = self.tokenizer.encode(string, **kw)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            import jinja2
            kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
            try:
                return self.tokenizer.apply_chat_template(chat_history, **kw)
            except jinja2.exceptions.TemplateError:      # templates without a system role
                return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kw)

        def get_model_info(self) -> dict[str, Any]:
            return {"model_kind": self.model.identity.get("kind"), "model_key": self.model.key,
                    "model_dtype": self.model.identity.get("dtype"), "codec": self.codec.identity,
                    "router_mode": self.router_mode}

        # -------------------------------------------------------------- scoring
        def _item(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"{NAME}: a request with {len(context)} context and {len(continuation)} "
                                 f"continuation tokens (need >= 1 each, continuation <= {self.max_length})")
            return (context + continuation)[-(self.max_length + 1):], len(continuation)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
            items = [self._item(ctx, cont) for _, ctx, cont in requests]
            bar = tqdm(total=len(items), desc="Running loglikelihood requests", disable=disable_tqdm)

            def done(idx, res):
                for i, r in zip(idx, res):
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                bar.update(len(idx))

            out = engine.score(self._params(stacked=True), self.cfg, items, self.buckets, hooks=self.hooks,
                               on_batch=done)
            bar.close()
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            strings = [req.args[0] for req in requests]
            items, owner = [], []
            for k, s in enumerate(strings):
                for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(s), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    items.append(self._item(ctx, cont))
                    owner.append(k)
            totals, left = [0.0] * len(strings), [owner.count(k) for k in range(len(strings))]
            bar = tqdm(total=len(strings), desc="Running loglikelihood_rolling requests", disable=disable_tqdm)

            def done(idx, res):
                for i, (lp, _) in zip(idx, res):
                    k = owner[i]
                    totals[k] += lp
                    left[k] -= 1
                    if left[k] == 0:
                        self.cache_hook.add_partial("loglikelihood_rolling", (strings[k],), totals[k])
                        bar.update(1)

            engine.score(self._params(stacked=True), self.cfg, items, self.buckets, hooks=self.hooks, on_batch=done)
            bar.close()
            return totals

        # -------------------------------------------------------------- generation
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            args = [req.args for req in requests]
            groups: dict[str, list[int]] = {}
            for i, (_, gk) in enumerate(args):
                groups.setdefault(json.dumps(gk, sort_keys=True, default=str), []).append(i)
            out: list[str | None] = [None] * len(args)
            bar = tqdm(total=len(args), desc="Running generate_until requests", disable=disable_tqdm)
            eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            for idx in groups.values():
                kw = normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
                max_gen = int(kw.pop("max_gen_toks"))
                if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0.0:
                    raise NotImplementedError(f"{NAME}: generation is greedy only; got generation kwargs "
                                              f"{args[idx[0]][1]} (do_sample / temperature > 0)")
                max_ctx = self.max_length - max_gen
                if max_ctx <= 0:
                    raise ValueError(f"{NAME}: max_gen_toks {max_gen} must be below max_length {self.max_length}")
                prompts = [self.tok_encode(args[i][0], left_truncate_len=max_ctx) for i in idx]

                def stop(k, ids, until=until):
                    text = self.tok_decode(ids, skip_special_tokens=False)
                    return any(s and s in text for s in until)

                def done(ks, res, idx=idx, until=until):
                    for k, ids in zip(ks, res):
                        i = idx[k]
                        s = postprocess_generated_text(self.tok_decode(ids), until, None)
                        out[i] = s
                        self.cache_hook.add_partial("generate_until", args[i], s)
                    bar.update(len(ks))

                engine.greedy(self._params(stacked=False), self.cfg, prompts, max_gen, stop, self.buckets,
                              eos_ids=self.eos_ids, pad_id=self.pad_id, hooks=self.hooks, on_batch=done)
            bar.close()
            return out  # type: ignore[return-value]

    CalderaJaxLM.__qualname__ = "CalderaJaxLM"
    CalderaJaxLM.__module__ = __name__
    return CalderaJaxLM


def register() -> type:
    """Registers the class with lm-eval as "caldera-jax" (idempotent) and returns it. lm-eval's
    own models are registered first: its registry fills itself only when it is empty."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry
    cls = lm_class()
    if NAME not in model_registry:
        model_registry.register(NAME)(cls)
    return cls


def __getattr__(name: str) -> Any:
    if name == "CalderaJaxLM":
        return lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
