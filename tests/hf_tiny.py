"""Tiny random transformers models for checkpoint and parity tests (CPU, no hub).

    path, model = tiny_hf_model("qwen3_moe", tmp_path)          # saved with save_pretrained
    ref = canonical_state_dict(model)                            # {canonical name: np.ndarray}

Every model: vocab 96, hidden 32, 2 layers, 4 heads, 2 kv heads, head_dim 8; MoE: 4 experts, top 2.
All weights are random (norm weights around 1), including the MoE routers.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen3_moe")

BASE_CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILY_CONFIG = {
    "llama": dict(bos_token_id=1, eos_token_id=2),
    "qwen2": dict(bos_token_id=1, eos_token_id=2),
    "qwen3": dict(bos_token_id=1, eos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      bos_token_id=1, eos_token_id=2),
}


def tiny_hf_config(model_type: str, **overrides):
    """A transformers config for a tiny `model_type` model (overrides win)."""
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, **{**BASE_CONFIG, **FAMILY_CONFIG[model_type], **overrides})


def randomize_(model, seed: int = 0, scale: float = 0.1) -> None:
    """Fills every parameter in place: N(0, scale²), norm weights 1 + N(0, scale²)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = scale * torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)


def tiny_hf_model(model_type: str, tmp_path, *, seed: int = 0, dtype=None, name: str | None = None,
                  save: bool = True, **overrides):
    """Builds a random tiny transformers model and saves it with save_pretrained.

    Returns (checkpoint directory as str, torch model in eval mode). `dtype` is a torch dtype
    (default float32); `overrides` go to the transformers config (e.g. tie_word_embeddings=True).
    """
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides))
    randomize_(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    path = os.path.join(os.fspath(tmp_path), name or f"hf-{model_type}")
    if save:
        model.save_pretrained(path)
    return path, model


def to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bit-exact (bfloat16 becomes ml_dtypes.bfloat16)."""
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def canonical_state_dict(model) -> dict[str, np.ndarray]:
    """The torch model's state dict under caldera_jax canonical names (flat).

    transformers 5 keeps experts fused in memory: mlp.experts.gate_up_proj [E, 2I, H] is split into
    mlp.experts.gate_proj.weight (rows :I) and mlp.experts.up_proj.weight (rows I:), and
    mlp.experts.down_proj [E, H, I] becomes mlp.experts.down_proj.weight. A tied lm_head is dropped.
    All arrays are C-contiguous (safetensors.numpy.save_file silently mis-writes strided views).
    """
    out: dict[str, np.ndarray] = {}
    for k, v in model.state_dict().items():
        a = to_numpy(v)
        if k.endswith("mlp.experts.gate_up_proj"):
            pre, i = k[: -len("gate_up_proj")], a.shape[1] // 2
            out[pre + "gate_proj.weight"] = np.ascontiguousarray(a[:, :i])
            out[pre + "up_proj.weight"] = np.ascontiguousarray(a[:, i:])
        elif k.endswith("mlp.experts.down_proj"):
            out[k + ".weight"] = a
        else:
            out[k] = a
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


# A character-level tokenizer (101 ids: 5 special tokens, then the printable ASCII characters),
# with a ChatML chat template, for tests that need text in and out (lm-eval). Use it with a tiny
# model of vocab_size >= TOKENIZER_VOCAB.
TOKENIZER_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 101
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(directory) -> str:
    """Writes the character-level tokenizer (tokenizer.json, tokenizer_config.json, chat template)
    into `directory` (bos <s> = 1, eos </s> = 2, as the tiny models' configs); returns it."""
    import string
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(list(TOKENIZER_SPECIALS) + chars)}
    assert len(vocab) == TOKENIZER_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(TOKENIZER_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(os.fspath(directory))
    return os.fspath(directory)


def with_smollm2_tokenizer(model_dir) -> str:
    """Copies the real SmolLM2-135M-Instruct tokenizer and chat template (the cached asset; make
    test fetches it) next to a tiny model built with vocab_size=49152; returns model_dir."""
    import shutil

    from experiments import assets
    if not assets.is_cached("smollm2-135m-instruct"):
        raise RuntimeError("asset 'smollm2-135m-instruct' is not cached: run `python -m experiments.assets "
                           "fetch smollm2-135m-instruct` (make test does)")
    src = assets.asset_path("smollm2-135m-instruct")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, model_dir)
    return str(model_dir)


def tiny_llama_dir(root, max_position_embeddings: int = 512) -> str:
    """A tiny random llama (vocab TOKENIZER_VOCAB + 3) with the character tokenizer, saved as a HF
    directory under root; returns its path."""
    path, _ = tiny_hf_model("llama", root, vocab_size=TOKENIZER_VOCAB + 3,
                            max_position_embeddings=max_position_embeddings)
    save_tiny_tokenizer(path)
    return path
