"""The one-kernel GPU decode step (include/mlxcy/gpu_step.h) against the
op-by-op MLX path of the same model: tiny random-weight Llama, Qwen2 (q/k/v
bias), Qwen3 (q/k norms) and Gemma 3 (sandwich norms, GELU, a sliding and a
global layer) checkpoints in float32, bfloat16 and MLX's 4/8-bit layout,
fused and unfused, across a KV-cache growth.  Each step feeds both
paths the same token (the op path's greedy choice), so the logits are compared
step by step; in float32 the greedy ids must agree too.  Runs where the
default device is a CUDA GPU (tools/gpu_tests.sh); elsewhere it checks that the
step is not taken."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, make_tiny, rel

import mlxcy as mx
from mlxcy.generation.engine import generate_ids
from mlxcy.generation.sample import Sampler
from mlxcy.models import base
from mlxcy.models.convert import convert_hf_to_mlx
from mlxcy.models.load import load_model

_REASON = mx.fast.gemv_unsupported_reason(mx.zeros((1, 64), dtype=mx.bfloat16),
                                          mx.zeros((8, 64), dtype=mx.bfloat16))
cuda = pytest.mark.skipif(_REASON is not None, reason=f"no CUDA GPU: {_REASON}")
GEMMA_WINDOW = 48


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen2", "qwen3", "gemma3_text"):
        d = tmp_path_factory.mktemp(kind)
        hf = make_tiny(kind, d)
        with torch.no_grad():        # wide logits: no greedy near-ties between the paths
            hf.model.embed_tokens.weight.mul_(8.0)
        if kind == "gemma3_text":    # a window the tests' steps stay inside (but one)
            hf.config.sliding_window = GEMMA_WINDOW
        hf.save_pretrained(d, safe_serialization=True)
        out[kind] = d
        for bits in (4, 8):
            q = tmp_path_factory.mktemp(f"{kind}{bits}")
            convert_hf_to_mlx(d, q, bits=bits, group_size=64, dtype="bfloat16")
            out[kind, bits] = q
    out["qwen2", "mixed"] = _mixed(out["qwen2", 4], out["qwen2"],
                                   tmp_path_factory.mktemp("qwen2mixed") / "m")
    return out


def _mixed(src, hf_dir, dst):
    """src (4-bit layers) with its tied embedding re-quantized from the float
    checkpoint to 8 bits, group 32: a GGUF's Q8_0 embedding beside Q4 layers."""
    import json
    import shutil

    from mlxcy import io
    shutil.copytree(src, dst)
    emb = io.load_safetensors(next(hf_dir.glob("*.safetensors")))[0]["model.embed_tokens.weight"]
    wq, sc, bi = mx.quantize(emb.astype(mx.bfloat16), group_size=32, bits=8)
    for f in dst.glob("*.safetensors"):
        w, meta = io.load_safetensors(f)
        if "model.embed_tokens.weight" in w:
            w.update({"model.embed_tokens.weight": wq, "model.embed_tokens.scales": sc,
                      "model.embed_tokens.biases": bi})
            io.save_safetensors(f, w, meta)
    cfg = json.loads((dst / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        if key in cfg:
            cfg[key]["model.embed_tokens"] = {"group_size": 32, "bits": 8}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _run(m, prompt, n, on, feed=None):
    """Prefill prompt, then n one-token steps; returns (fed ids, logits [n, V]).
    (The prompt runs op by op: the several-positions kernel is off here.)"""
    old = base.set_gpu_decode_step(on)
    old_verify = base.set_gpu_verify_step(False)
    try:
        cache = m.make_cache()
        lg = m(np.array([prompt], np.int32), cache)
        t = int(np.argmax(np.asarray(lg.astype(mx.float32))[0, -1]))
        ids, rows = [], []
        for i in range(n):
            t = feed[i] if feed is not None else t
            ids.append(t)
            lg = m(np.array([[t]], np.int32), cache)
            row = np.asarray(lg.astype(mx.float32))[0, -1]
            rows.append(row)
            t = int(np.argmax(row))
        cache.free()
        return ids, np.stack(rows)
    finally:
        base.set_gpu_decode_step(old)
        base.set_gpu_verify_step(old_verify)


def _compare(m, prompt, n, tol, exact_ids, op_steps=0):
    """op_steps: steps expected on the op path (one per cache growth)."""
    ids, want = _run(m, prompt, n, on=False)
    before = base.gpu_decode_steps()
    got_ids, got = _run(m, prompt, n, on=True, feed=ids)
    for i in range(n):
        assert rel(got[i], want[i]) <= tol, (i, rel(got[i], want[i]))
    assert base.gpu_decode_steps() - before == n - op_steps, "the one-kernel step was not taken"
    if exact_ids:
        assert [int(np.argmax(r)) for r in got] == [int(np.argmax(r)) for r in want]


def _ring_growths(kind):
    """Op-path steps in 16-24 steps after a 12-token prompt: Gemma's sliding
    layer keeps its ring, sized to the prompt and 8 padding slots, which grows
    (on the op path) at position 20."""
    return 1 if kind == "gemma3_text" else 0


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


@cuda
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fused", [False, True])
def test_float_models_match_the_op_path(checkpoints, kind, dtype, fused):
    m = load_model(checkpoints[kind], dtype=dtype)
    if fused:
        m.fuse()
    try:
        tol = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}[dtype]
        _compare(m, _prompt(1, 12), 24, tol, exact_ids=dtype == "float32",
                 op_steps=_ring_growths(kind))
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_models_match_the_op_path(checkpoints, kind, bits):
    m = load_model(checkpoints[kind, bits])
    m.fuse()
    try:
        _compare(m, _prompt(2, 12), 16, 3e-2, exact_ids=False, op_steps=_ring_growths(kind))
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("kind,dtype,bits,mode", [
    ("llama", "float32", 0, True), ("qwen2", "bfloat16", 0, True), ("qwen3", None, 4, True),
    ("qwen2", None, 8, True), ("gemma3_text", "float32", 0, True), ("gemma3_text", None, 4, True),
    # longer pieces of each down row (Llama-3.2-1B bf16 takes 8 chunks)
    ("llama", "float32", 0, 8), ("qwen2", "bfloat16", 0, 8), ("qwen3", None, 4, 4)])
def test_the_split_mlp_matches_the_op_path(checkpoints, kind, dtype, bits, mode):
    """The MLP split over slices (down's sums by atomics, the residual in two
    buffers), forced on: the tiny models have too few slices for the default."""
    old = base.set_gpu_step_split(mode)
    try:
        m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind], dtype=dtype)
        m.fuse()
        try:
            assert base.gpu_step_slice(m, 132) == (2 if mode is True else mode)
            tol = {"float32": 1e-4, "bfloat16": 3e-2, None: 3e-2}[dtype]
            _compare(m, _prompt(7, 12), 24, tol, exact_ids=dtype == "float32",
                     op_steps=_ring_growths(kind))
        finally:
            m.close()
    finally:
        base.set_gpu_step_split(old)


def test_the_split_setting():
    old = base.set_gpu_step_split(False)
    try:
        assert base.set_gpu_step_split(True) is False
        assert base.set_gpu_step_split(8) is True
        assert base.set_gpu_step_split(None) == 8
        for bad in (1, 3, "8"):
            with pytest.raises(TypeError, match="mode must be None, True, False, 2, 4 or 8"):
                base.set_gpu_step_split(bad)
    finally:
        base.set_gpu_step_split(old)


@pytest.mark.parametrize("kind,dtype,bits,blocks,mode,want", [
    # float32 (4 values a chunk), 128 hidden rows: 16, 8 or 4 slices of 2, 4 or
    # 8 chunks; of those that give the busiest block the fewest rows, the
    # longest pieces
    ("llama", "float32", 0, 4, None, 8),      # 4 x 8 = 2 x 16 = 1 x 32 rows
    ("llama", "float32", 0, 8, None, 4),      # 2 x 8 = 1 x 16 < 1 x 32
    ("llama", "float32", 0, 16, None, 2),     # 1 x 8
    ("llama", "float32", 0, 40, None, 0),     # 16 slices: fewer than one for two blocks
    ("llama", "float32", 0, 40, True, 2),     # ... unless forced
    ("llama", "float32", 0, 4, False, 0),
    ("llama", "float32", 0, 132, 8, 8),
    ("llama", "bfloat16", 0, 2, None, 8),     # 8 values a chunk: 8, 4 or 2 slices
    ("qwen3", None, 4, 1, None, 4),           # 32 values a chunk: 2 or 1 slices (8: not whole)
    ("qwen3", None, 4, 132, 8, 0)])
def test_the_kernel_chooses_its_mlp_slices(checkpoints, kind, dtype, bits, blocks, mode, want):
    """gpu_step_slice: the host's choice (host arithmetic, any device)."""
    old = base.set_gpu_step_split(mode)
    try:
        m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind], dtype=dtype)
        try:
            m.fuse()
            assert base.gpu_step_slice(m, blocks) == want
        finally:
            m.close()
    finally:
        base.set_gpu_step_split(old)


@cuda
def test_an_embedding_in_its_own_format(checkpoints):
    """4-bit layers with an 8-bit (group 32) tied embedding and head."""
    m = load_model(checkpoints["qwen2", "mixed"])
    m.fuse()
    try:
        _compare(m, _prompt(9, 12), 16, 3e-2, exact_ids=False)
    finally:
        m.close()


@cuda
def test_steps_across_the_cache_growth(checkpoints):
    # a 256-step cache holds 264 positions at first: decode from 250 to 290;
    # the step at 264 grows the buffers on the op path, the kernel resumes after
    m = load_model(checkpoints["qwen3"], dtype="float32")
    try:
        _compare(m, _prompt(3, 250), 40, 1e-4, exact_ids=True, op_steps=1)
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("prompt", [12, GEMMA_WINDOW + 12])
def test_gemma_slides_its_window_in_the_kernel(checkpoints, dtype, tol, prompt):
    """Gemma's sliding layer attends over its last GEMMA_WINDOW positions, its
    ring full from position 48 on: the kernel writes each new key over the
    oldest and attends over the ring.  A 12-token prompt's ring (12 + 8
    padding slots) grows once, at 20, on the op path; a 60-token prompt's is
    full from the start, rotated by 12."""
    m = load_model(checkpoints["gemma3_text"], dtype=dtype)
    try:
        _compare(m, _prompt(13, prompt), 60, tol, exact_ids=dtype == "float32",
                 op_steps=1 if prompt < GEMMA_WINDOW else 0)
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("kind,dtype,tol", [("llama", "float32", 1e-4), ("qwen2", "bfloat16", 3e-2)])
def test_long_contexts_merge_chunks_of_a_head(checkpoints, kind, dtype, tol):
    # past 256 positions a head's tiles span several blocks (chunks of 8 tiles),
    # merged through L2: 600 positions are 19 tiles, chunks of 8, 8 and 3
    m = load_model(checkpoints[kind], dtype=dtype)
    try:
        _compare(m, _prompt(11, 600), 12, tol, exact_ids=dtype == "float32")
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("lookup", [None, 4])
def test_engine_generation_matches_the_op_path(checkpoints, lookup):
    """The engine pipelines steps (the next one queued before the last is
    read) and, with prompt lookup, trims the caches after verification steps:
    the kernel's device-held position must follow both."""
    m = load_model(checkpoints["qwen3"], dtype="float32")
    prompt = _prompt(6, 24) * 2                  # a repeated prompt: lookup proposes
    try:
        outs, steps = {}, 0
        for on in (False, True):
            old = base.set_gpu_decode_step(on)
            try:
                before = base.gpu_decode_steps()
                outs[on] = [ev.token for ev in generate_ids(
                    m, prompt, sampler=Sampler(temperature=0.0), max_tokens=48,
                    prompt_lookup=lookup)]
                steps = base.gpu_decode_steps() - before
            finally:
                base.set_gpu_decode_step(old)
        assert outs[True] == outs[False]
        assert steps >= (40 if lookup is None else 1)   # verification steps: several positions
    finally:
        m.close()


def _check_chunks(m, prompt, sizes, seed, tol, exact_ids):
    """Chunks of random tokens of the given sizes after a prompt, the kernel
    on and off: one kernel step per chunk, every position's logits within
    tol of the op path's (exact_ids: the same greedy ids too)."""
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(0, VOCAB, n).tolist() for n in sizes]
    want = _chunks(m, _prompt(8, prompt), chunks, on=False)
    before = base.gpu_decode_steps()
    got = _chunks(m, _prompt(8, prompt), chunks, on=True)
    assert base.gpu_decode_steps() - before == len(chunks)
    for c, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        for i in range(len(g)):
            assert rel(g[i], w[i]) <= tol, (c, i, rel(g[i], w[i]))
        if exact_ids:
            assert (g.argmax(-1) == w.argmax(-1)).all(), c


def _chunks(m, prompt, chunks, on):
    """Prefill prompt op by op, then feed each chunk of tokens in one forward
    (several positions), then two one-token steps; the logits of every chunk."""
    old, old_verify = base.set_gpu_decode_step(on), base.set_gpu_verify_step(on)
    try:
        cache = m.make_cache()
        base.set_gpu_decode_step(False)
        m(np.array([prompt], np.int32), cache)
        base.set_gpu_decode_step(on)
        out = [np.asarray(m(np.array([c], np.int32), cache).astype(mx.float32))[0]
               for c in chunks]
        cache.free()
        return out
    finally:
        base.set_gpu_decode_step(old)
        base.set_gpu_verify_step(old_verify)


@cuda
@pytest.mark.parametrize("kind,dtype,bits", [
    ("llama", "float32", 0), ("qwen2", "float32", 0), ("qwen3", "float32", 0),
    ("llama", "bfloat16", 0), ("qwen3", "float16", 0), ("qwen2", None, 4), ("qwen3", None, 8),
    # float32 activations over quantized weights (a GGUF's layout): the products
    # on the tensor cores in two bfloat16 parts
    ("qwen2", "float32", 4), ("llama", "float32", 8)])
def test_several_positions_match_the_op_path(checkpoints, kind, dtype, bits):
    """Chunks of 2-9 tokens (a speculative step's proposals), then single tokens,
    through the several-positions kernel: every position's logits against the op
    path's, and the device-held position following the chunks."""
    m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind], dtype=dtype)
    m.fuse()
    tol = {"float32": 5e-4 if bits else 1e-4, "bfloat16": 3e-2, "float16": 4e-3, None: 3e-2}[dtype]
    try:
        _check_chunks(m, 30, (2, 5, 9, 1, 3, 1), 7, tol, dtype == "float32")
    finally:
        m.close()


def _rows(m, prompts, steps, on, feed=None):
    """An unpadded batch (one prompt a row) prefilled op by op, then `steps`
    one-token steps of every row, each feeding the rows' greedy tokens (or
    feed's); returns (the tokens fed [steps, B, 1], the logits [steps, B, V])."""
    old = base.set_gpu_decode_step(False)
    try:
        cache = m.make_cache()
        m(np.array(prompts, np.int32), cache)
        base.set_gpu_decode_step(on)
        fed, out = [], []
        t = np.array([[p[-1]] for p in prompts], np.int32)
        for i in range(steps):
            fed.append(t)
            out.append(np.asarray(m(t, cache).astype(mx.float32))[:, 0])
            t = feed[i + 1] if feed is not None and i + 1 < steps else \
                out[-1].argmax(-1).astype(np.int32)[:, None]
        cache.free()
        return fed, np.stack(out)
    finally:
        base.set_gpu_decode_step(old)


ROW_MODELS = [("llama", "float32", 0), ("qwen2", "float32", 0), ("qwen3", "bfloat16", 0),
              ("qwen2", None, 4), ("qwen3", None, 8), ("gemma3_text", "float32", 0),
              ("gemma3_text", "bfloat16", 0), ("gemma3_text", None, 4), ("qwen2", None, "mixed"),
              ("qwen2", "float32", "mixed")]


@cuda
@pytest.mark.parametrize("kind,dtype,bits,B", [
    (k, d, b, B) for k, d, b in ROW_MODELS
    for B in (3, 16) + (() if d == "float32" and not b else (40, 64))])
def test_a_batchs_rows_match_the_op_path(checkpoints, kind, dtype, bits, B):
    """One token in each of B rows a step (16: the most one launch takes in
    float32, on CUDA cores; 64 in bfloat16 and quantized models, on the tensor
    cores, float32 ones in launches of 32): every row's logits against the op
    path's."""
    m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind], dtype=dtype)
    m.fuse()
    prompts = [_prompt(20 + b, 18) for b in range(B)]
    try:
        fed, want = _rows(m, prompts, 6, on=False)
        before = base.gpu_decode_steps()
        _, got = _rows(m, prompts, 6, on=True, feed=fed)
        assert base.gpu_decode_steps() - before == 6
        tol = {"float32": 5e-4 if bits else 1e-4, "bfloat16": 3e-2, None: 3e-2}[dtype]
        for i in range(6):
            for b in range(B):
                assert rel(got[i, b], want[i, b]) <= tol, (i, b, rel(got[i, b], want[i, b]))
        if dtype == "float32":
            assert (got.argmax(-1) == want.argmax(-1)).all()
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("kind,bits", [("qwen3", 4), ("gemma3_text", 0)])
def test_a_batch_in_several_launches_matches_the_op_path(checkpoints, kind, bits):
    """40 rows in launches of at most 16 (three: rows 0-12, 13-25, 26-39), each
    writing its own rows of the caches."""
    m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind],
                   dtype=None if bits else "bfloat16")
    m.fuse()
    prompts = [_prompt(60 + b, 18) for b in range(40)]
    old = base.set_gpu_launch_rows(16)
    try:
        fed, want = _rows(m, prompts, 4, on=False)
        before = base.gpu_decode_steps()
        _, got = _rows(m, prompts, 4, on=True, feed=fed)
        assert base.gpu_decode_steps() - before == 4
        for i in range(4):
            for b in range(40):
                assert rel(got[i, b], want[i, b]) <= 3e-2, (i, b, rel(got[i, b], want[i, b]))
    finally:
        base.set_gpu_launch_rows(old)
        m.close()


@cuda
@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text"])
def test_a_padded_batch_generates_as_on_the_op_path(checkpoints, kind):
    """The engine's left-padded rows (prompts of 3-17 tokens, some joining a
    running batch) through the kernel's batch form: each row rotated at its
    own position and blind to its padding, so greedy tokens equal the op
    path's (Gemma: its sliding layer's ring growing)."""
    from mlxcy.generation.engine import Engine
    m = load_model(checkpoints[kind], dtype="float32")
    try:
        outs, steps = {}, {}
        for on in (False, True):
            old = base.set_gpu_decode_step(on)
            before = base.gpu_decode_steps()
            try:
                eng = Engine(m, max_batch=4, prefill_chunk=64)
                ids = [eng.add(_prompt(30 + i, n), max_tokens=12) for i, n in enumerate((3, 17, 9))]
                got = {i: [] for i in ids}
                for step in range(80):
                    if step == 3:
                        i = eng.add(_prompt(40, 5), max_tokens=10)
                        got[i] = []
                    if not eng.has_work():
                        break
                    for ev in eng.step():
                        got[ev.seq_id].append(ev.token)
                eng.close()
                outs[on] = list(got.values())
                steps[on] = base.gpu_decode_steps() - before
            finally:
                base.set_gpu_decode_step(old)
        assert outs[True] == outs[False]
        assert steps[False] == 0 and steps[True] >= (10 if kind == "qwen3" else 1)
    finally:
        m.close()


@cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_gemmas_several_positions_match_the_op_path(checkpoints, dtype, tol):
    """Gemma's verification steps while its sliding layer's ring grows (a
    12-token prompt leaves it 8 slots of room): chunks of 2, 5 and 1 tokens."""
    m = load_model(checkpoints["gemma3_text"], dtype=dtype)
    try:
        _check_chunks(m, 12, (2, 5, 1), 9, tol, dtype == "float32")
    finally:
        m.close()


@cuda
def test_not_taken_for_masks_or_lora_like_changes(checkpoints):
    m = load_model(checkpoints["llama"], dtype="float32")
    try:
        before = base.gpu_decode_steps()
        cache = m.make_cache()
        m(np.array([_prompt(4, 8)] * 2, np.int32), cache)
        m(np.array([[1], [2]], np.int32), cache, mask=np.ones((2, 1, 1, 9), bool))   # a mask
        assert base.gpu_decode_steps() == before
        old = base.set_gpu_rows_step(False)
        try:
            m(np.array([[1], [2]], np.int32), cache)         # two rows, the batch form off
        finally:
            base.set_gpu_rows_step(old)
        assert base.gpu_decode_steps() == before
        m(np.array([[1], [2]], np.int32), cache)             # two rows: the batch form
        assert base.gpu_decode_steps() == before + 1
        before += 1
        cache = m.make_cache()
        m(np.array([_prompt(4, 8)] * 17, np.int32), cache)
        m(np.array([[1]] * 17, np.int32), cache)             # more rows than one launch takes
        assert base.gpu_decode_steps() == before
        cache = m.make_cache()
        m(np.array([_prompt(4, 8)], np.int32), cache, last_only=True)   # a prompt: op path
        assert base.gpu_decode_steps() == before
        m(np.array([[1]], np.int32), cache, offsets=[8])    # explicit positions: op path
        assert base.gpu_decode_steps() == before
        m(np.array([[1]], np.int32), cache)
        assert base.gpu_decode_steps() == before + 1
        m(np.array([_prompt(5, 17)], np.int32), cache)      # more positions than one launch takes
        assert base.gpu_decode_steps() == before + 1
        m(np.array([_prompt(5, 16)], np.int32), cache)      # 16: one launch
        assert base.gpu_decode_steps() == before + 2
    finally:
        m.close()


def _plan_after(m, n, positions=1):
    cache = m.make_cache()
    old = base.set_gpu_decode_step(False)
    try:
        m(np.array([_prompt(14, n)], np.int32), cache)
    finally:
        base.set_gpu_decode_step(old)
    return base.gpu_step_plan(m, cache, positions), cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernel_is_given_gemmas_form(checkpoints, dtype):
    """(Any device) what the kernel would get for Gemma: its block form, the
    embedding's factor sqrt(64) in the model's dtype, each layer's RoPE row
    (the sliding layer's base 1e4, the global one's 1e6: transformers'
    defaults), each layer's cache capacity (a ring of the 12 positions plus
    its padding, a KVCache of 256 plus padding)."""
    m = load_model(checkpoints["gemma3_text"], dtype=dtype)
    try:
        plan, cache = _plan_after(m, 12)
        assert plan is not None and plan["gemma"] and plan["embed_scale"] == 8.0
        i = np.arange(8)
        np.testing.assert_allclose(plan["inv_freq"], [1e4 ** (-i / 8), 1e6 ** (-i / 8)],
                                   rtol=1e-6)
        assert plan["offset"] == 12 and plan["entries"] == 2 * 33 + 7
        assert plan["caps"] == [c.state()["keys"].shape[2] for c in cache.layers]
        assert plan["caps"][0] < plan["caps"][1]
        assert plan["windows"] == [GEMMA_WINDOW, 0] and plan["rotations"] == [0, 0]
        # several positions while the ring has room for them (its 8 padding slots)
        assert base.gpu_step_plan(m, cache, 8) is not None
        assert base.gpu_step_plan(m, cache, 9) is None
    finally:
        m.close()


@pytest.mark.parametrize("n", [GEMMA_WINDOW - 1, GEMMA_WINDOW, GEMMA_WINDOW + 12])
def test_the_kernel_is_given_gemmas_full_rings(checkpoints, n):
    """A prompt of n positions leaves the sliding layer's ring growing (n < 48:
    position p in slot p) or full, holding positions n - 48 .. n - 1 from
    slot 0: the new key goes over the oldest, slot (n - rotation) mod 48."""
    m = load_model(checkpoints["gemma3_text"], dtype="float32")
    try:
        plan, cache = _plan_after(m, n)
        assert plan["offset"] == n and plan["windows"] == [GEMMA_WINDOW, 0]
        assert plan["rotations"] == [n % GEMMA_WINDOW if n >= GEMMA_WINDOW else 0, 0]
        st = cache.layers[0].state()
        assert (n - plan["rotations"][0]) % GEMMA_WINDOW == st["idx"]
        assert base.gpu_step_plan(m, cache, 2) is None     # past the window: one at a time
    finally:
        m.close()


def test_the_kernel_plans_plain_models_as_before(checkpoints):
    m = load_model(checkpoints["llama"], dtype="float32")
    try:
        plan, cache = _plan_after(m, 12)
        assert not plan["gemma"] and plan["embed_scale"] == 0.0
        assert plan["entries"] == 2 * 33 + 7 and len(set(plan["caps"])) == 1
        assert (plan["inv_freq"] == plan["inv_freq"][0]).all()
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
@pytest.mark.parametrize("n", [12, GEMMA_WINDOW + 2])
def test_the_kernel_is_given_a_batchs_caches(checkpoints, kind, n):
    """A batch's step takes every layer's [B, ...] buffers (Gemma's sliding
    layer: while its ring grows), and a plan for other rows is refused."""
    m = load_model(checkpoints[kind], dtype="float32")
    cache = m.make_cache()
    old = base.set_gpu_decode_step(False)
    try:
        m(np.array([_prompt(14, n)] * 3, np.int32), cache)
        plan = base.gpu_step_plan(m, cache, 1, 3)
        if kind == "gemma3_text" and n > GEMMA_WINDOW:
            assert plan is None                                   # a full ring
        else:
            assert [np.asarray(k).shape[0] for k in plan["keys"]] == [3, 3]
            assert plan["offset"] == n
            assert base.gpu_step_plan(m, cache, 1, 2) is None      # rows not the buffers'
            assert base.gpu_step_plan(m, cache, 2, 3) is None      # one position a row
    finally:
        base.set_gpu_decode_step(old)
        m.close()


@pytest.mark.parametrize("kind,bits,dtype,most", [
    ("llama", 0, "bfloat16", 64), ("qwen2", 4, None, 64), ("llama", 0, "float32", 16),
    ("qwen2", "mixed", "float32", 64)])
def test_a_launch_takes_64_rows_on_the_tensor_cores(checkpoints, kind, bits, dtype, most):
    """A batch step's rows: up to 64 where the products run on the tensor cores
    (2-byte activations, or float32 in two parts over quantized weights and
    embedding), 16 on CUDA cores (float32)."""
    m = load_model(checkpoints[kind, bits] if bits else checkpoints[kind], dtype=dtype)
    old = base.set_gpu_decode_step(False)
    try:
        for B in (most, most + 1):
            cache = m.make_cache()
            m(np.array([_prompt(14, 6)] * B, np.int32), cache)
            assert (base.gpu_step_plan(m, cache, 1, B) is not None) == (B == most), B
            cache.free()
    finally:
        base.set_gpu_decode_step(old)
        m.close()


def test_the_mixed_checkpoint_is_what_it_claims(checkpoints):
    """(Off a GPU too) the mixed checkpoint holds an 8-bit, group-32 embedding
    beside 4-bit layers, and a model loaded from it runs on it: its logits
    differ from the all-4-bit model's."""
    from mlxcy import io
    d = checkpoints["qwen2", "mixed"]
    w = {}
    for f in d.glob("*.safetensors"):
        w.update(io.load_safetensors(f)[0])
    V, D = np.asarray(io.load_safetensors(next(checkpoints["qwen2"].glob("*.safetensors")))[0][
        "model.embed_tokens.weight"].shape)
    assert tuple(w["model.embed_tokens.weight"].shape) == (V, D // 4)       # 8 bits
    assert tuple(w["model.embed_tokens.scales"].shape) == (V, D // 32)      # group 32
    assert w["model.layers.0.self_attn.o_proj.weight"].shape[-1] * 8 == \
        w["model.layers.0.self_attn.o_proj.scales"].shape[-1] * 64       # 4 bits, group 64
    ids = np.array([_prompt(10, 6)], np.int32)
    outs = []
    for path in (d, checkpoints["qwen2", 4]):
        m = load_model(path)
        try:
            outs.append(np.asarray(m(ids).astype(mx.float32)))
        finally:
            m.close()
    assert np.isfinite(outs[0]).all() and 0 < rel(outs[0], outs[1]) < 0.2


_TIMED = """
import sys
import numpy as np
from mlxcy.models import base
from mlxcy.models.load import load_model
base.set_gpu_verify_step(False)               # the prompt op by op: 6 one-token kernels
base.set_gpu_step_split(sys.argv[4] == "1")
m = load_model(sys.argv[1], dtype="float32")
cache = m.make_cache()
prompt = [int(x) for x in sys.argv[2].split(",")]
t = int(np.argmax(np.asarray(m(np.array([prompt], np.int32), cache))[0, -1]))
ids = [t]
for i in range(6):
    row = np.asarray(m(np.array([[t]], np.int32), cache))[0, -1]
    t = int(np.argmax(row))
    ids.append(t)
tm = base.gpu_step_timing(m)
np.save(sys.argv[3], tm)
print(" ".join(map(str, ids)), base.gpu_decode_steps(), m.config.num_hidden_layers)
"""


@cuda
@pytest.mark.parametrize("split", [False, True])
def test_step_timing_records_every_barrier(checkpoints, tmp_path, split):
    """MLXCY_STEP_TIMING=1 (read once per process, hence a subprocess): the
    kernel records each block's clock at its start, at every barrier (5 a
    layer, 4 with the MLP split) and at its end, in order, no block released
    before the last one arrived, and once inside each phase, between its
    start and its end; the tokens are the op path's."""
    import os
    import subprocess
    import sys
    out = tmp_path / "tm.npy"
    prompt = _prompt(6, 8)
    r = subprocess.run([sys.executable, "-c", _TIMED, str(checkpoints["llama"]),
                        ",".join(map(str, prompt)), str(out), "1" if split else "0"],
                       env={**os.environ, "MLXCY_STEP_TIMING": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    *ids, steps, layers = map(int, r.stdout.split())
    assert steps == 6
    m = load_model(checkpoints["llama"], dtype="float32")
    try:
        old = base.set_gpu_decode_step(False)
        cache = m.make_cache()
        t = int(np.argmax(np.asarray(m(np.array([prompt], np.int32), cache))[0, -1]))
        want = [t]
        for i in range(6):
            t = int(np.argmax(np.asarray(m(np.array([[t]], np.int32), cache))[0, -1]))
            want.append(t)
        cache.free()
        base.set_gpu_decode_step(old)
    finally:
        m.close()
    assert ids == want
    tm = np.load(out).astype(np.int64)
    nb = (tm.shape[0] - 2) // 3
    assert tm.shape[0] == 2 + 3 * nb and nb == (4 if split else 5) * layers and tm.shape[1] >= 1
    t = (tm - tm[0].min()) % (1 << 32)          # the clock's low word, from the first start
    ordered = t[:2 + 2 * nb]                    # start, (arrival, release) per barrier, end
    assert (np.diff(ordered, axis=0) >= 0).all(), "a block's readings out of order"
    for p in range(nb):                          # barrier p: arrivals row 1 + 2p, releases 2 + 2p
        assert t[2 + 2 * p].min() >= t[1 + 2 * p].max(), f"barrier {p} released early"
        mid = t[2 + 2 * nb + p]                  # inside phase p: after its start, before its end
        assert (mid >= ordered[2 * p]).all() and (mid <= ordered[1 + 2 * p]).all(), p


def test_off_gpu_the_step_is_not_taken(checkpoints):
    if _REASON is None:
        pytest.skip("a CUDA GPU is the default device")
    m = load_model(checkpoints["llama"], dtype="float32")
    try:
        before = base.gpu_decode_steps()
        _run(m, _prompt(5, 6), 3, on=True)
        assert base.gpu_decode_steps() == before
        assert base.gpu_verify_positions(m) == 0     # the engine's proposals: not capped
    finally:
        m.close()
