"""References for the fine-tuning tests (tests/train/): batches, the adapters'
math written out in PyTorch on the Hugging Face model (hooks on its linear
layers), and central differences of mlxcy's own loss."""
import numpy as np
import torch

import mlxcy
from mlxcy.train.lora import make_batch_arrays
from tiny_models import VOCAB

KEYS3 = ["q_proj", "v_proj", "down_proj"]
FULL = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def batch(seed=1, B=3, T=14):
    """(ids, offsets, lengths) of B rows: prompts of 0/3/5 tokens, rows shorter
    than T padded with id 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    offsets = np.array([0, 3, 5][:B], np.int32)
    lengths = np.array([T, T - 4, T - 2][:B], np.int32)
    for i in range(B):
        ids[i, lengths[i]:] = 0
    return ids, offsets, lengths


def torch_loss(hf, ids, off, ln):
    """The mean next-token cross-entropy over the trained positions."""
    x, y, mask = make_batch_arrays(ids, off, ln)
    logits = hf(torch.tensor(x, dtype=torch.long)).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(y, dtype=torch.long).reshape(-1),
                                           reduction="none").reshape(y.shape)
    m = torch.tensor(mask)
    return (ce * m).sum() / m.sum()


def lora(scale):
    """LoRA: out + s (x A) B."""
    def adapt(mod, p):
        a, b = p["lora_a"], p["lora_b"]
        return lambda m, inp, out: out + scale * ((inp[0] @ a) @ b)
    return adapt


def dora(scale):
    """DoRA as mlx-lm's DoRALinear: m / ||W + s (A B).T||_row (no gradient
    through the norm) * (W x + s x A B)."""
    def adapt(mod, p):
        a, b, mag = p["lora_a"], p["lora_b"], p["m"]

        def hook(m, inp, out):
            adapted = m.weight + scale * (a @ b).T
            g = mag / torch.linalg.norm(adapted, dim=1).detach()
            return g * (out + scale * ((inp[0] @ a) @ b))
        return hook
    return adapt


def torch_grads(hf, params, adapt, keys, ids, off, ln, nlayers):
    """(loss, {name: gradient}) in PyTorch with the adapters `params` (numpy,
    by mlxcy's names) on `keys` of the top `nlayers` layers; adapt(module,
    {"lora_a": tensor, ...}) gives a layer's forward hook (lora(s), dora(s))."""
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    hooks = []
    L = hf.config.num_hidden_layers
    for i in range(L - nlayers, L):
        for key in keys:
            name = f"model.layers.{i}.{FULL[key]}."
            mod = hf.model.layers[i].get_submodule(FULL[key])
            mine = {k[len(name):]: t for k, t in tp.items() if k.startswith(name)}
            hooks.append(mod.register_forward_hook(adapt(mod, mine)))
    try:
        loss = torch_loss(hf, ids, off, ln)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return loss.item(), {k: v.grad.numpy() for k, v in tp.items()}


def central_difference(step, lora_, name, base, idx, ids, off, ln, h=1e-2):
    """d loss / d name[idx] of mlxcy's loss (step: a TrainStep over lora_), by
    central differences around `base` (float64 numpy); name is set back to base."""
    vals = []
    for sgn in (1, -1):
        p = base.copy()
        p[idx] += sgn * h
        lora_.set_parameters({name: mlxcy.array(p.astype(np.float32))}, strict=False)
        vals.append(step.evaluate(ids, off, ln))
    lora_.set_parameters({name: mlxcy.array(base.astype(np.float32))}, strict=False)
    return (vals[0][0] / vals[0][1] - vals[1][0] / vals[1][1]) / (2 * h)


def save_mlx_lm_adapters(path, weights, config):
    """Adapters as mlx-lm writes them: adapters.safetensors (mlx.core arrays,
    mlx-lm's names) and adapter_config.json."""
    import json
    import mlx.core as mc
    path.mkdir()
    mc.save_safetensors(str(path / "adapters.safetensors"), dict(weights))
    (path / "adapter_config.json").write_text(json.dumps(config))


def logits_with_adapters(model_dir, adapter_dir, ids):
    """mlxcy's logits for ids of the model at model_dir with the adapters at
    adapter_dir (mlxcy's or mlx-lm's format)."""
    from mlxcy.models.load import load_model
    from mlxcy.train.adapters import load_adapters
    m = load_model(model_dir)
    try:
        load_adapters(m, adapter_dir)
        return np.array(m(ids))
    finally:
        m.close()
