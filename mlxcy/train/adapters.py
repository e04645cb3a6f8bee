"""Adapters in mlx-lm's layout, and fusing them into a saved model.

    adapters.safetensors   model.layers.N.<key>.lora_a [in, r], .lora_b [r, out]
                           (+ .m [out] for DoRA; for full fine-tuning the top N
                           blocks' own tensors, model.layers.N.<module>.weight/.bias)
    adapter_config.json    {"fine_tune_type": "lora" | "dora" | "full", "num_layers": N,
                            "lora_parameters": {"rank", "scale", "dropout", "keys"}, ...}

so `mlx_lm.load(model, adapter_path=dir)` loads ours and load_adapters() loads
mlx-lm's. fuse_model() folds adapters into a checkpoint's weights and writes a
model directory (Hugging Face safetensors names; MLX's quantized layout and a
"quantization" config entry when the base is quantized, unless dequantize).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["AdapterError", "save_adapters", "load_adapters", "read_adapter_config",
           "fuse_model", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


from mlxcy.errors import AdapterError  # noqa: E402,F401  (re-exported)
from mlxcy.json_files import read_json_object  # noqa: E402


def save_adapters(lora, path, extra_config: dict | None = None,
                  filename: str = ADAPTER_FILE) -> Path:
    """Write the adapters (and adapter_config.json) into directory `path`."""
    from mlxcy.models.load import save_safetensors
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_safetensors(d / filename, lora.parameters())
    cfg = dict(extra_config or {})
    cfg.update(lora.config())
    tmp = d / (CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=4, default=str)
    tmp.replace(d / CONFIG_FILE)
    return d / filename


def read_adapter_config(path) -> dict:
    d = Path(path)
    p = d / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: adapter config not found")
    cfg = read_json_object(p, AdapterError)
    from mlxcy.train.lora import FINE_TUNE_TYPES
    ftype = cfg.get("fine_tune_type", "lora")
    if ftype not in FINE_TUNE_TYPES:
        raise AdapterError(f"{p}: fine_tune_type {ftype!r} is not supported (choose from "
                           f"{', '.join(FINE_TUNE_TYPES)})")
    if "num_layers" not in cfg:
        raise AdapterError(f"{p}: no num_layers")
    if ftype == "full":
        return cfg
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict) or "rank" not in lp or "scale" not in lp:
        raise AdapterError(f"{p}: lora_parameters must give 'rank' and 'scale'")
    return cfg


def load_adapters(model, path, filename: str | None = None, strict: bool = True):
    """Attach the adapters saved in directory `path` (ours or mlx-lm's) to
    `model`; returns the LoRA object."""
    from mlxcy.models.load import read_safetensors
    from mlxcy.train.lora import LoRA, KEYS
    d = Path(path)
    cfg = read_adapter_config(d)
    ftype = cfg.get("fine_tune_type", "lora")
    f = d / (filename or ADAPTER_FILE)
    weights, _ = read_safetensors(f)
    num_layers = int(cfg["num_layers"])
    nblocks = len(model.layers) if hasattr(model, "layers") else model.config.num_hidden_layers
    num_layers = -1 if num_layers < 0 or num_layers > nblocks else num_layers
    if ftype == "full":
        try:
            lora = LoRA(model, num_layers=num_layers, fine_tune_type="full")
            lora.set_parameters(weights, strict=strict)
        except ValueError as e:
            raise AdapterError(f"{d}: {e}") from None
        return lora
    lp = cfg["lora_parameters"]
    keys = lp.get("keys")
    if keys is None:      # mlx-lm: every linear layer of the adapted blocks
        present = {k.split(".", 3)[3].rsplit(".", 1)[0] for k in weights
                   if k.startswith("model.layers.")}
        keys = [k for k in KEYS if k in present]
    leaves = (".lora_a", ".lora_b", ".m") if ftype == "dora" else (".lora_a", ".lora_b")
    bad = [k for k in weights if not k.endswith(leaves)]
    if bad:
        raise AdapterError(f"{f}: not {ftype.upper()} tensors: {bad[:5]}")
    try:
        lora = LoRA(model, rank=int(lp["rank"]), scale=float(lp["scale"]),
                    dropout=float(lp.get("dropout", 0.0)), keys=keys,
                    num_layers=num_layers, fine_tune_type=ftype)
        lora.set_parameters(weights, strict=strict)
    except ValueError as e:
        raise AdapterError(f"{d}: {e}") from None
    return lora


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                    "chat_template.jinja", "chat_template.json", "added_tokens.json")


def fuse_model(model_path, adapter_path, out_path, dequantize: bool = False,
               dtype=None) -> Path:
    """Fold the adapters at adapter_path into the checkpoint at model_path
    (a directory or GGUF file) and write a model directory to out_path."""
    from mlxcy import core, transforms
    from mlxcy.models import build_model
    from mlxcy.models.load import load_weights, save_safetensors
    from mlxcy.nn import dequantize as dq
    src = Path(model_path)
    weights, config, quant = load_weights(src, dtype)
    model = build_model(config, weights, quantization=quant, dtype=dtype)
    try:
        lora = load_adapters(model, adapter_path)
        fused = lora.fused_weights(dequantize=dequantize)
    except BaseException:
        model.close()
        raise
    model.close()
    if dtype is not None:
        dt = core.dtype(dtype)
        for k, v in list(weights.items()):
            if v.dtype.is_floating and v.dtype != dt:
                weights[k] = v.astype(dt)
    weights.update(fused)
    if dequantize:       # fused modules are float now: drop their quantization tensors
        for k in fused:
            base = k[: -len(".weight")]
            for extra in (".scales", ".biases"):
                old = weights.pop(base + extra, None)
                if old is not None:
                    old.free()
    config = dict(config)
    if dequantize and quant:
        for k in [k for k in weights if k.endswith(".scales")]:
            base = k[: -len(".scales")]
            qs = quant.get(base) if isinstance(quant.get(base), dict) else quant
            sc = weights.pop(k)
            bi = weights.pop(base + ".biases", None)
            w = weights[base + ".weight"]
            weights[base + ".weight"] = dq(w, sc, bi, int(qs.get("group_size", quant.get("group_size", 64))),
                                            int(qs.get("bits", quant.get("bits", 4))))
        quant = None
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    transforms.eval(list(weights.values()))
    save_safetensors(out / "model.safetensors", weights, {"format": "mlx"})
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=4, default=str)
    if src.is_dir():
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    else:                       # a GGUF base: its tokenizer, written out
        from mlxcy.models.convert import write_gguf_tokenizer
        write_gguf_tokenizer(src, out)
    for a in weights.values():
        try:
            a.free()
        except Exception:
            pass
    return out
