"""Tiny models for the CLI tests: a Llama with a byte-level BPE tokenizer
trained on TEXT (make_model); the same with a chat template and an EOS row of
lm_head that is zero, so greedy decoding never ends early (make_cli_model);
and that model written as a llama GGUF file (f32 tensors, llama.cpp's q/k row
permutation, gpt2 tokenizer metadata)."""
from __future__ import annotations

import json

import numpy as np

from tiny_models import BASE


TEXT = ("the quick brown fox jumps over the lazy dog while seven wizards quietly "
        "judge boxing matches and a mild breeze drifts past the old stone mill")


def make_model(path):
    """A tiny Llama with a byte-level BPE tokenizer trained on TEXT (the
    command reads tokenizer.json with mlxcy's own BPE tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(BASE, vocab_size=tok.get_vocab_size(), tie_word_embeddings=False))
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return tok.get_vocab_size()


CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_cli_model(path):
    """Write the model directory; returns the EOS id."""
    from safetensors.numpy import load_file, save_file
    make_model(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    eos = vocab[cfg["eos_token"]]
    w = load_file(str(path / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"].copy()
    w["lm_head.weight"][eos] = 0.0          # logit 0 < the best of 300 random logits
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return eos


def _permute(w, n_head):
    """llama.cpp's row order for q/k (interleaved RoPE)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def make_llama_gguf(hf_dir, out):
    """The model directory written by make_cli_model as a llama GGUF."""
    import gguf
    from safetensors.numpy import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    w = load_file(str(hf_dir / "model.safetensors"))
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    wr = gguf.GGUFWriter(str(out), "llama")
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_rope_freq_base(cfg["rope_theta"] if "rope_theta" in cfg
                          else cfg["rope_parameters"]["rope_theta"])
    wr.add_key_length(cfg["head_dim"])
    wr.add_value_length(cfg["head_dim"])
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_types([3 if t in specials else 1 for t in tokens])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    wr.add_token_merges(merges)
    wr.add_bos_token_id(vocab[tcfg["bos_token"]])
    wr.add_eos_token_id(vocab[tcfg["eos_token"]])
    wr.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, a in w.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        if k in names:
            wr.add_tensor(names[k], a)
            continue
        _, _, i, rest = k.split(".", 3)
        mod = rest.rsplit(".", 1)[0]
        if mod == "self_attn.q_proj":
            a = _permute(a, nh)
        elif mod == "self_attn.k_proj":
            a = _permute(a, nkv)
        wr.add_tensor(f"blk.{i}.{per[mod]}.weight", np.ascontiguousarray(a))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return out
