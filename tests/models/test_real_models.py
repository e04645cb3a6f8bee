"""Real GGUF checkpoints (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M,
Qwen2.5-Coder-0.5B Q4_K_M) loaded by mlxcy, against transformers (fp32, on the
GGUF converted to a Hugging Face directory) and mlx-lm (same fp32 directory).

Independent of our name mapping: the prompts' token ids decode (with the GGUF's
own vocabulary) to the prompt text, and the greedy continuations are the facts
they should be (" Rome")."""
import shutil

import numpy as np
import pytest

import mlxcy
from mlxcy import assets
from mlxcy.models.convert import convert_gguf_to_hf
from mlxcy.models import gguf as G
from mlxcy.models.load import load_model

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow

CAPITALS = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
MODELS = {
    # token ids of the prompts (from the GGUFs' tokenizers); checked by decoding below
    "smollm2": (assets.smollm2_gguf, CAPITALS,
                [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30,
                 378, 3575, 282, 7158, 314], " Rome"),
    "gemma3": (assets.gemma3_gguf, CAPITALS,
               [2, 818, 5279, 529, 7001, 563, 9079, 236761, 669, 5279, 529, 9405, 563, 15687,
                236761, 669, 5279, 529, 11702, 563], " Rome"),
    "qwen25": (assets.qwen25_gguf, 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
               [750, 75698, 1445, 982, 262, 4210, 5598, 279, 308, 7563, 79683, 1372, 14442],
               "    if n"),
}
N_NEW = 32


def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def gguf_decode(tokens, model_kind, ids):
    """Decode with the GGUF vocabulary: gpt2 byte-level BPE or SentencePiece pieces."""
    if model_kind == "gpt2":
        dec = _byte_decoder()
        return bytes(dec[c] for i in ids for c in tokens[i]).decode("utf-8", "replace")
    return "".join(tokens[i] for i in ids if i > 3).replace("\u2581", " ")


def _greedy_mlx_lm(path, ids):
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.models.cache import make_prompt_cache
    model, _ = mlx_lm_load(path)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(N_NEW):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def _greedy_ours(model, ids):
    cache = model.make_cache()
    logits = model(mlxcy.array(np.array([ids], np.int32)), cache)
    out = []
    for _ in range(N_NEW):
        tok = int(np.argmax(logits[0, -1].astype(mlxcy.float32).numpy()))
        out.append(tok)
        logits = model(mlxcy.array(np.array([[tok]], np.int32)), cache)
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def real(request, tmp_path_factory):
    get, text, ids, expect = MODELS[request.param]
    path = get()     # a missing asset skips (tests/conftest.py)
    d = tmp_path_factory.mktemp(request.param)
    convert_gguf_to_hf(path, d, dtype="float32", tokenizer=False)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
        ref = ref.to(torch.bfloat16)     # transformers' own bf16 error, for scale
        bf16_logits = ref(torch.tensor([ids])).logits[0].float().numpy()
    del ref
    info = dict(name=request.param, gguf=path, dir=d, text=text, ids=ids, expect=expect,
                ref_logits=ref_logits, torch_bf16_err=_rel(bf16_logits, ref_logits),
                mlx_lm_greedy=_greedy_mlx_lm(d, ids))
    yield info
    shutil.rmtree(d, ignore_errors=True)


def _logits(model, ids):
    return model(mlxcy.array(np.array([ids], np.int32)))[0].astype(mlxcy.float32).numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_prompt_ids_decode_to_prompt(real):
    h = G.read_header(real["gguf"], keep_arrays=True)
    kind = h.metadata["tokenizer.ggml.model"]
    text = gguf_decode(h.metadata["tokenizer.ggml.tokens"], kind, real["ids"])
    assert text == real["text"]
    cont = gguf_decode(h.metadata["tokenizer.ggml.tokens"], kind, real["mlx_lm_greedy"])
    assert cont.startswith(real["expect"]) or real["expect"] in cont[:40], cont


def test_bf16_logits_match_transformers(real):
    model = load_model(real["gguf"], dtype="bfloat16")
    try:
        ours = _logits(model, real["ids"])
    finally:
        model.close()
    ref = real["ref_logits"]
    # 2e-2, or transformers' own bf16 error where bf16 itself is further off
    # (SmolLM2 on this prompt: torch bf16 2.6e-2, mlx-lm bf16 2.3e-2 = ours)
    err = _rel(ours, ref)
    print(f"{real['name']}: bf16 rel {err:.4f}, torch bf16 rel {real['torch_bf16_err']:.4f}")
    assert err < max(2e-2, 1.25 * real["torch_bf16_err"])
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_default_load_matches_transformers(real):
    """Default dtype: SmolLM2 stays Q4_1/Q8_0 (MLX's quantized layout with float32
    scales: exact). The K-quant files dequantize to bfloat16 by default, which the
    bf16 test covers."""
    if real["name"] != "smollm2":
        pytest.skip("dequantized by default: same weights as the bf16 test")
    model = load_model(real["gguf"])
    try:
        assert model.info()["quantization"] == {"bits": 4, "group_size": 32}
        ours = _logits(model, real["ids"])
    finally:
        model.close()
    assert _rel(ours, real["ref_logits"]) < 1e-4


def test_greedy_matches_mlx_lm(real):
    model = load_model(real["dir"], dtype="float32")
    try:
        ours = _greedy_ours(model, real["ids"])
    finally:
        model.close()
    assert ours == real["mlx_lm_greedy"]
