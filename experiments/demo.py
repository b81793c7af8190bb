"""The embedded default job (until compression lands): SmolLM2-135M-Instruct, fetched offline once.

    python -m experiments.demo

1. fetches the model and the Shakespeare corpus with the assets command (no-op when cached);
2. loads the HF directory into our pure-JAX decoder;
3. prints perplexity on the held-out text (16 windows x 512 tokens);
4. answers a chat prompt with the KV-cache greedy decoder, through the model's chat template.
"""
from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from caldera_jax.eval.perplexity import model_perplexity
from caldera_jax.models import generate
from caldera_jax.checkpoints_io.model_source import load_model
from experiments import assets
from caldera_jax.eval.perplexity import tokenize_text

DEFAULT_MODEL = "smollm2-135m-instruct"


def chat(params, cfg, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = generate(params, cfg, np.asarray([ids]), max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"HF dir or GGUF (default: the {DEFAULT_MODEL} asset)")
    ap.add_argument("--max-tokens", type=int, default=16 * 512)
    args = ap.parse_args(argv)
    model = args.model or str(assets.fetch(DEFAULT_MODEL))
    text = assets.fetch("shakespeare") / "valid.txt"
    t0 = time.perf_counter()
    cfg, params, tok = load_model(model, dtype=jnp.float32)
    print(f"loaded {model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size} "
          f"({time.perf_counter() - t0:.1f}s)")
    res = model_perplexity(params, cfg, tokenize_text(tok, str(text)), seq_len=512, max_tokens=args.max_tokens)
    print(f"perplexity on held-out Shakespeare ({res['tokens']} tokens): {res['ppl']:.3f}")
    prompt = "What is the capital of France?"
    reply = chat(params, cfg, tok, prompt)
    print(f"user: {prompt}\nassistant: {reply}")
    res["chat"] = {"prompt": prompt, "reply": reply}
    print(json.dumps({k: v for k, v in res.items() if k != "chat"}))
    return res


if __name__ == "__main__":
    main()
