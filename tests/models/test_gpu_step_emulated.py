"""The one-token GPU kernel's device code run on the CPU (tools/emulate_gpu_step.py:
g++, one block of 256 OS threads) against the op path of tiny random-weight
models: its logic -- the pointer table, the phases' buffers, Gemma's sandwich
norms and its sliding layers' rings, the split MLP -- checked on any machine
with a C++20 compiler.  What only a GPU shows (several blocks, speed) is
tests/models/test_gpu_step.py's."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import emulate_gpu_step as emu  # noqa: E402


def _assert_close(err, same_ids, dtype, bits):
    """The emulated logits' error against the op path's, by the two paths' dtypes."""
    if bits and dtype == "float32":   # float32 in two bfloat16 parts (one alone: ~2e-3)
        assert err <= 5e-4 and same_ids, (err, same_ids)
    elif bits or dtype != "float32":   # the op path rounds to bfloat16 where the kernel
        # sums in float
        assert err <= 3e-2, err
    else:
        assert err <= 1e-5 and same_ids, (err, same_ids)


@pytest.mark.parametrize("kind,prompt,steps,split,dtype,bits,positions,hidden", [
    ("llama", 20, 3, 0, "float32", 0, 1, 0),
    ("qwen2", 20, 3, 2, "float32", 0, 1, 0),
    # several positions a step (verify_step: a speculative step's proposals)
    ("llama", 20, 2, 0, "float32", 0, 5, 0),
    # Gemma: the sliding layer's ring (window 48) growing for 8 steps, then full;
    # a ring full from the prompt on, rotated by 12; the split MLP with 4-bit weights
    ("gemma3_text", 40, 10, 0, "float32", 0, 1, 0),
    ("gemma3_text", 60, 3, 0, "float32", 0, 1, 0),
    ("gemma3_text", 40, 10, 2, None, 4, 1, 0),
    # Gemma's several positions while the ring grows (30 + 8 slots)
    ("gemma3_text", 30, 1, 0, "float32", 0, 8, 0),
    # hidden 320: above the block's 256 threads, so a thread takes two of the
    # split MLP's down rows and two of the residual's values
    ("llama", 20, 2, 2, "float32", 0, 1, 320),
    # slices of 8 chunks of each down row (Llama-3.2-1B bf16's on a GPU): a
    # slice's 32 (float32) or 64 (bfloat16) hidden rows taken by the warps in
    # several passes
    ("llama", 20, 2, 8, "float32", 0, 1, 320),
    ("llama", 20, 2, 8, "bfloat16", 0, 1, 320),
    # 4-bit slices of 2 chunks (Llama-3.2-1B 4-bit's on a GPU) over hidden 320:
    # each thread takes two down rows' pieces and their scales
    ("llama", 20, 2, 2, None, 4, 1, 320),
    # 4-bit products of width 2048 (Llama-3.2-1B's): two chunks of each row a
    # lane, so a pass's rows share two chunks' sums of x (rows_use)
    ("llama", 12, 2, 0, None, 4, 1, 2048),
    # float32 activations over 4- and 8-bit weights (a GGUF's layout on a GPU):
    # several positions' products on the tensor cores in two bfloat16 parts
    ("llama", 20, 2, 0, "float32", 4, 5, 0),
    ("qwen3", 20, 2, 0, "float32", 8, 9, 0),
])
def test_the_kernels_code_matches_the_op_path(kind, prompt, steps, split, dtype, bits, positions,
                                              hidden):
    err, same_ids = emu.run(kind, prompt, steps, window=48, split=split, dtype=dtype, bits=bits,
                            positions=positions, hidden=hidden)
    _assert_close(err, same_ids, dtype, bits)


@pytest.mark.parametrize("kind,dtype,head_dim", [
    # one-token steps over heads of 64, 128 and 256 values (the tiny model's
    # are 16), in float32 to be held to its tolerance (256: value rows of 64
    # 16-byte chunks, the path for rows of more than 32), and Gemma's 256 in
    # bfloat16 over its sliding ring.  Heads of more than 128 bytes take tiles
    # of fewer positions (tile_positions): 16 / 8 / 4 positions of 2 / 4 / 8
    # lanes each here, Gemma's 8 of 4; 70 positions are then two chunks of
    # tiles at 128 values, merged through L2
    ("llama", "float32", 64), ("llama", "float32", 128), ("llama", "float32", 256),
    ("gemma3_text", "bfloat16", 256)])
def test_large_heads_match_the_op_path(kind, dtype, head_dim):
    err, same_ids = emu.run(kind, 70, 3, window=48, split=0, dtype=dtype, head_dim=head_dim)
    _assert_close(err, same_ids, dtype, 0)


@pytest.mark.parametrize("kind,rows,dtype,bits,head_dim", [
    ("llama", 6, "float32", 0, 0), ("gemma3_text", 4, "float32", 0, 0),
    # the products on the tensor cores (2-byte activations): two m-tiles of 16
    # rows, the second half of each tile's rows (8 .. 15) in use; head_dim 256:
    # o_proj 1,024 wide, a warp's 4 units' weights requested together
    ("llama", 18, "bfloat16", 0, 0), ("qwen2", 12, None, 4, 0), ("llama", 18, "bfloat16", 0, 256),
    # float32 over 4-bit weights: 24 operand rows (two parts of 12)
    ("qwen2", 12, "float32", 4, 0)])
def test_a_padded_batchs_rows_match_the_op_path(kind, rows, dtype, bits, head_dim):
    """verify_step's ROWS form (a batch's one-token step): left-padded rows, row
    b 3b tokens shorter, each rotated at its own position and attending from
    its padding's end."""
    err, same_ids = emu.run(kind, 20, 3, split=0, dtype=dtype, bits=bits, rows=rows,
                            head_dim=head_dim)
    _assert_close(err, same_ids, dtype, bits)
