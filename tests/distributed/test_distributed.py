"""Distributed inference over MLX's ring backend: N local processes on
127.0.0.1 (mlxcy.distributed.launch, as mlx.launch starts them), each with a hard
timeout.  Collectives against numpy; tensor-parallel logits, incremental
decoding and greedy ids against the single-process model (fp32); a rank
that dies or never connects ends the run with an error within seconds."""
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import subproc
from mlxcy.distributed import launch

HERE = Path(__file__).resolve().parents[1]       # tests/: the shared helpers
WORKER = str(HERE / "dist_worker.py")


def _env(**kw):
    # exact products on the CPU (the int16 default rounds one-row products'
    # x differently from the reference's many-row ones: ~1e-4)
    return subproc.env(OMP_NUM_THREADS=1, MLXCY_CPU_ACTIVATIONS="float32", **kw)


def _hostfile(tmp_path, n):
    """A ring hostfile of n free local ports (what mlx.launch writes)."""
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in launch.free_ports(n)]))
    return hf


@contextmanager
def _two_ranks(tmp_path, action):
    """Two workers running `action` over a ring hostfile with no launcher to
    stop them (a 3 s deadline on their collectives); killed when the block ends."""
    hf = _hostfile(tmp_path, 2)
    procs = [subprocess.Popen([sys.executable, WORKER, action, str(tmp_path)],
                              env=_env(MLX_RANK=r, MLX_HOSTFILE=hf, T=3),
                              stderr=subprocess.PIPE) for r in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _launch(n, args, timeout=120, **env):
    code, msg = launch.run(n, ["nice", "-n", "5", sys.executable, WORKER] + args,
                           timeout=timeout, env=_env(**env))
    return code, msg


@pytest.mark.parametrize("n", [2, 4])
def test_collectives(tmp_path, n):
    code, msg = _launch(n, ["ops", str(tmp_path)], timeout=90)
    assert code == 0, msg
    xs = [np.arange(24, dtype=np.float32).reshape(2, 3, 4) * (r + 1) - r for r in range(n)]
    for r in range(n):
        ld = lambda name: np.load(tmp_path / f"{name}.{r}.npy")
        assert ld("size")[0] == n
        np.testing.assert_array_equal(ld("sum"), np.sum(xs, axis=0))
        np.testing.assert_array_equal(ld("max"), np.max(xs, axis=0))
        np.testing.assert_array_equal(ld("gather"), np.concatenate([x[:, :2] for x in xs]))
        np.testing.assert_array_equal(
            ld("isum"), np.array([sum(q + 1 for q in range(n)), 10 * sum(range(n))], np.int32))
        np.testing.assert_array_equal(ld("recv"), np.full(3, 100 + (r - 1) % n, np.float32))


def test_dead_rank_ends_the_run(tmp_path):
    t0 = time.monotonic()
    code, msg = _launch(2, ["die", str(tmp_path)], timeout=60, T=5)
    assert code != 0 and "rank 1 exited with code 9" in msg
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "survived.0.npy").exists()


def test_survivor_watchdog_names_the_failure(tmp_path):
    # without a launcher stopping it the survivor ends by itself: MLX's ring
    # raises when the peer's socket closes; a peer that hangs instead trips
    # the deadline's watchdog (exit code 75)
    with _two_ranks(tmp_path, "die") as procs:
        t0 = time.monotonic()
        err = procs[0].communicate(timeout=40)[1].decode()
        assert procs[0].returncode in (1, 75), err
        assert ("connection to a peer was lost" in err
                or "rank 0: the test's all_sum did not finish within 3 s" in err), err
        assert time.monotonic() - t0 < 30
        assert procs[1].wait(timeout=10) == 9


def test_missing_peer_times_out_at_init(tmp_path):
    hf = _hostfile(tmp_path, 2)
    p = subprocess.run([sys.executable, WORKER, "ops", str(tmp_path)],
                       env=_env(MLX_RANK=0, MLX_HOSTFILE=hf, MLXCY_DIST_TIMEOUT=3),
                       stderr=subprocess.PIPE, timeout=40)
    err = p.stderr.decode()
    assert p.returncode == 75, err
    assert "did not connect to its peers within 3 s" in err


# ------------------------------------------------------------ tensor parallel ---

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    import tiny_models
    out = {}
    base = tmp_path_factory.mktemp("tiny")
    for mt in ("llama", "qwen3", "gemma3_text"):
        tiny_models.make_tiny(mt, base / mt, tokenizer=True)
        out[mt] = base / mt
    from mlxcy.models.convert import convert_hf_to_mlx
    convert_hf_to_mlx(base / "llama", base / "llama4bit", bits=4, group_size=32)
    out["llama4bit"] = base / "llama4bit"
    return out


def _reference(d, ids):
    from mlxcy import cpu_kernels
    from mlxcy.models.load import load_model
    old = cpu_kernels.set_activations("float32")     # as the workers (_env)
    try:
        with load_model(d, dtype="float32") as m:
            full = m(ids).numpy()
            cache = m.make_cache()
            steps = [m(ids[:, :7], cache=cache).numpy()[:, -1]]
            for t in range(7, ids.shape[1]):
                steps.append(m(ids[:, t:t + 1], cache=cache).numpy()[:, -1])
            return full, np.stack(steps, 1), m.nbytes()
    finally:
        cpu_kernels.set_activations(old)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text", "llama4bit"])
@pytest.mark.parametrize("plan", ["tensor", "pipeline"])
def test_parallel_logits(tiny_dirs, tmp_path, name, plan):
    ids = np.random.default_rng(3).integers(0, 96, (2, 12)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    code, msg = _launch(2, ["logits", str(tmp_path), str(tiny_dirs[name])], timeout=120,
                        PLAN=plan)
    assert code == 0, msg
    full, steps, nbytes = _reference(tiny_dirs[name], ids)
    for r in range(2):
        got = np.load(tmp_path / f"logits.{r}.npy")
        assert got.shape == full.shape
        assert _rel(got, full) <= 1e-5, (r, _rel(got, full))
        gs = np.load(tmp_path / f"steps.{r}.npy")
        assert _rel(gs, steps) <= 1e-5, (r, _rel(gs, steps))
        # greedy ids of every position equal
        np.testing.assert_array_equal(got.argmax(-1), full.argmax(-1))
        # each rank holds its shard of the layers: less than the whole model
        assert np.load(tmp_path / f"nbytes.{r}.npy")[0] < nbytes


def test_kv_heads_must_divide(tiny_dirs, tmp_path):
    from mlxcy.models.load import load_config, parse_config
    from mlxcy.distributed.parallel import ParallelPlanError, tensor_parallel_config
    cfg = parse_config(load_config(tiny_dirs["llama"]), "config.json")
    with pytest.raises(ParallelPlanError, match="num_key_value_heads = 2 is not divisible by 4"):
        tensor_parallel_config(cfg, 4)
    local = tensor_parallel_config(cfg, 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim,
            local.intermediate_size) == (2, 1, 16, 64)


def test_hanging_peer_trips_the_deadline(tmp_path):
    with _two_ranks(tmp_path, "hang") as procs:
        t0 = time.monotonic()
        err = procs[0].communicate(timeout=40)[1].decode()
        assert procs[0].returncode == 75, err
        assert "rank 0: the test's all_sum did not finish within 3 s" in err
        assert time.monotonic() - t0 < 30
        assert not (tmp_path / "survived.0.npy").exists()


# ------------------------------------------------------------------ generation ---

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from cli_models import make_cli_model
    d = tmp_path_factory.mktemp("dist_cli") / "model"
    make_cli_model(d)              # vocabulary 320: the head splits 160 + 160
    return d


def _cli(args, launcher=None, timeout=180, **env):
    cmd = [sys.executable, "-m", "mlxcy"] + args
    if launcher == "mlxcy":
        cmd = [sys.executable, "-m", "mlxcy", "launch", "-n", "2", "--timeout", str(timeout),
               "--"] + cmd
    elif launcher == "mlx":
        cmd = [os.path.join(os.path.dirname(sys.executable), "mlx.launch"), "-n", "2",
               "--backend", "ring", "--"] + cmd
    p = subprocess.run(["nice", "-n", "5"] + cmd, env=_env(**env), cwd=subproc.CWD, capture_output=True,
                       timeout=timeout + 30)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


@pytest.mark.parametrize("sampling,plan", [(["--temperature", "0"], "tensor"),
                                           (["--temperature", "0.8", "--seed", "3"], "tensor"),
                                           (["--temperature", "0.8", "--seed", "3"], "pipeline")])
def test_generate_under_mlxcy_launch(cli_model, sampling, plan):
    args = ["generate", "--model", str(cli_model), "--raw", "hello", "--max-tokens", "12"]
    c1, single, e1 = _cli(args + sampling)
    assert c1 == 0, e1
    c2, tp, e2 = _cli(args + sampling, launcher="mlxcy", MLXCY_PARALLEL=plan)
    assert c2 == 0, e2
    assert tp == single            # rank 0 prints once; the other ranks stay silent
    assert len(single.strip()) > 0


def test_generate_under_mlx_launch_with_a_shared_seed(cli_model):
    # no --seed: rank 0 draws one and the ranks share it; the end-of-run check
    # raises if the ranks' ids differ
    c, out, err = _cli(["generate", "--model", str(cli_model), "--raw", "hello",
                        "--max-tokens", "8", "--temperature", "1.0"], launcher="mlx")
    assert c == 0, err
    assert "different tokens" not in err
    # rank 0 alone prints: with the seed shared, a second rank's text would
    # repeat the first (the random model's text may hold newlines itself, so
    # its lines are not counted)
    half = len(out) // 2
    assert out.endswith("\n") and not (len(out) % 2 == 0 and out[:half] == out[half:]), out
