"""Tiny random-weight Hugging Face checkpoints for loader/convert tests
(transformers + torch write them with save_pretrained)."""
from __future__ import annotations

import numpy as np

VOCAB = 96

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)

CONFIGS = {
    "llama": dict(BASE, tie_word_embeddings=False),
    "qwen2": dict(BASE, tie_word_embeddings=True),
    "qwen3": dict(BASE, tie_word_embeddings=False),
    # gemma: transformers' default rope thetas (1e6 global, 1e4 local), which are also
    # mlx-lm 0.32's defaults: mlx-lm does not read transformers 5's rope_parameters.
    "gemma3_text": dict({k: v for k, v in BASE.items() if k != "rope_theta"},
                        tie_word_embeddings=True, query_pre_attn_scalar=16,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        sliding_window_pattern=2,
                        hidden_activation="gelu_pytorch_tanh"),
    # every layer slides over 8 positions (the tests' 12-token prompts pass it)
    "mistral": dict(BASE, tie_word_embeddings=False, sliding_window=8),
}


def _config(model_type, overrides=None):
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "gemma3_text": tf.Gemma3TextConfig, "mistral": tf.MistralConfig}[model_type]
    return cls(**dict(CONFIGS[model_type], **(overrides or {})))


def make_tiny(model_type, path, dtype="float32", seed=0, tokenizer=True, config=None,
              **save_kwargs):
    """Save a random tiny model of model_type (config: fields to change) to
    path; returns the torch model."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = _config(model_type, config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():           # non-trivial norms (HF initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if model_type.startswith("gemma") else 1.0))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(str(path), **save_kwargs)
    if tokenizer:
        save_tokenizer(path)
    return model


def save_tokenizer(path):
    """A word-level tokenizer over VOCAB tokens (mlx_lm.load/convert need one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1",
                                   bos_token="t2")
    fast.save_pretrained(str(path))


def torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def ids_for(seed=1, batch=1, length=12):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
