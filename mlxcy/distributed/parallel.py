"""Tensor-parallel loading over MLX's distributed layer (mlxcy.distributed).

    import mlxcy.distributed as dist
    from mlxcy.distributed.parallel import load_tensor_parallel
    model = load_tensor_parallel("path/to/model", dist.init(backend="ring"))

Each of the N ranks of the group reads only its shard of the safetensors
(numpy memmap slices: the pages it reads and the arrays it keeps are ~1/N
of the layers):

- q/k/v_proj and gate/up_proj: output rows [r*n/N, (r+1)*n/N) (column
  parallel): this rank computes H/N query heads, Hkv/N key/value heads (GQA
  groups stay whole: query head j uses kv head j // (H/Hkv) on every rank)
  and F/N of the MLP's hidden features;
- o_proj and down_proj: input columns of the same ranges (row parallel),
  their outputs summed over the group (distributed.AllSumLinear, one
  all_sum each); a bias is added by rank 0 only;
- the output head (lm_head, or the tied embedding's rows): vocabulary rows
  [r*V/N, ...), zero rows padding the last shard, logits gathered
  (distributed.GatherLinear);
- embeddings and norms: whole on every rank.

The model is the family's ordinary Model built from a per-rank config
(heads, kv heads and intermediate size divided by N, head_dim kept);
install_tensor_parallel swaps in the two communicating layers.  Every rank
then computes the full logits, so generation runs the same engine on every
rank (see mlxcy.distributed_generate / docs/distributed.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mlxcy.errors import ModelFormatError
from mlxcy.models.spec import LAYER_LINEARS

_COLUMN = tuple(LAYER_LINEARS[i].rsplit(".", 1)[1] for i in (0, 1, 2, 4, 5))  # q k v gate up
_ROW = tuple(LAYER_LINEARS[i].rsplit(".", 1)[1] for i in (3, 6))            # o down


class ParallelPlanError(ModelFormatError):
    """The model cannot be split over this many ranks (names the field)."""


def tensor_parallel_config(cfg, n: int):
    """The per-rank config of a tensor-parallel split over n ranks."""
    if n < 1:
        raise ValueError(f"tensor parallel: need at least 1 rank, got {n}")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        v = getattr(cfg, key)
        if v % n:
            raise ParallelPlanError(
                f"tensor parallel: {key} = {v} is not divisible by {n} ranks "
                f"(each rank takes whole {'heads' if 'heads' in key else 'features'}; "
                f"use a rank count that divides {v})")
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // n,
                       num_key_value_heads=cfg.num_key_value_heads // n,
                       intermediate_size=cfg.intermediate_size // n,
                       tie_word_embeddings=True)


def _role(name: str):
    """('column' | 'row', leaf) for a layer linear's tensor, else None."""
    parts = name.rsplit(".", 2)
    if len(parts) < 3:
        return None
    _, layer, leaf = parts
    if layer in _COLUMN:
        return "column", leaf
    if layer in _ROW:
        return "row", leaf
    return None


class _Reader:
    """Slices of one safetensors file's tensors, read through a memmap."""

    def __init__(self, path):
        from mlxcy.models.load import safetensors_header
        self.path = Path(path)
        self.header, _, self.start = safetensors_header(path)
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def read(self, name, rows=None, cols=None, pad_rows=0):
        """Tensor `name` (its stored name), rows/cols as (start, stop) ranges;
        pad_rows zero rows appended.  Returns an mlxcy Array (a copy)."""
        import mlxcy.core as core
        from mlxcy.models.load import _ST_DTYPES
        info = self.header[name]
        npd, mlxname = _ST_DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        x = self.mm[self.start + b:self.start + e].view(np.ndarray).view(npd)
        x = x.reshape(info["shape"])
        if rows is not None:
            x = x[rows[0]:rows[1]]
        if cols is not None:
            x = x[:, cols[0]:cols[1]]
        x = np.ascontiguousarray(x)
        if pad_rows:
            x = np.concatenate([x, np.zeros((pad_rows,) + x.shape[1:], x.dtype)])
        a = core.array(x)
        if mlxname == "bfloat16":
            a = a.view(core.bfloat16)
        return a


def _scan(path, plan):
    """(ModelConfig, quantization, readers, where, infos) of a checkpoint
    directory, checked by the loader before anything is read (every tensor
    present and shaped for the config): where maps each tensor's mlxcy name
    to (its file's reader, its stored name), infos to (shape, dtype)."""
    from mlxcy.models.load import scan_dir
    path = Path(path)
    if not path.is_dir():
        raise ParallelPlanError(f"{path}: {plan} loading needs a safetensors checkpoint "
                                "directory (GGUF files are not split)")
    _, cfg, quantization, files, tensors = scan_dir(path)
    readers = {f: _Reader(f) for f in files}
    where = {name: (readers[f], k) for name, (f, k, _) in tensors.items()}
    infos = {name: info for name, (_, _, info) in tensors.items()}
    return cfg, quantization, list(readers.values()), where, infos


@contextmanager
def _reading(readers, *arrays):
    """Around the reading of a rank's tensors: on failure every array read so
    far (the dicts `arrays`) is freed; the files' memmaps are closed either way."""
    from mlxcy.models.load import _free
    try:
        yield
    except BaseException:
        for d in arrays:
            _free(d)
        raise
    finally:
        for rd in readers:
            del rd.mm


def _head_linear(head, quantization, head_src, dtype, inputs, rows):
    """The output head (a Linear of `rows` outputs) over the `head` tensors read
    from head_src (a tied head is the embedding's rows, quantized as it is);
    the tensors are freed."""
    from mlxcy.models.base import Weights
    from mlxcy.models.load import _free
    q = quantization
    if q is not None and head_src != "lm_head" and isinstance(q.get(head_src), (dict, bool)):
        q = dict(q, lm_head=q[head_src])
    try:
        return Weights(head, q, dtype).linear("lm_head", inputs, rows)
    finally:
        _free(head)


def load_tensor_parallel(path, group=None, dtype=None):
    """This rank's part of the checkpoint directory `path` as a tensor-parallel
    Model over `group` (default: mlxcy.distributed.world()).  Logits and
    generation equal the single-process model's (up to float summation order)."""
    from mlxcy import distributed as dist
    from mlxcy import ops
    from mlxcy.models import build_model

    group = dist.world() if group is None else group
    n, r = group.size, group.rank
    cfg, quantization, readers, where, infos = _scan(path, "tensor parallel")
    local = tensor_parallel_config(cfg, n)
    weights = {}
    head = {}
    V = cfg.vocab_size
    vs = -(-V // n)                                 # head rows per rank
    v0, v1 = min(r * vs, V), min((r + 1) * vs, V)
    tied = cfg.tie_word_embeddings
    head_src = "model.embed_tokens" if tied else "lm_head"
    with _reading(readers, weights, head):
        for name, (rd, k) in where.items():
            shape = infos[name][0]
            if name.startswith(head_src + "."):
                head["lm_head." + name.rsplit(".", 1)[1]] = rd.read(
                    k, rows=(v0, v1), pad_rows=vs - (v1 - v0))
                if not tied:
                    continue
            role = _role(name)
            if role is None:
                weights[name] = rd.read(k)
                continue
            kind, leaf = role
            if kind == "column":
                s = shape[0] // n
                weights[name] = rd.read(k, rows=(r * s, (r + 1) * s))
            elif leaf == "bias":                    # row parallel: rank 0 adds it
                a = rd.read(k)
                weights[name] = a if r == 0 else ops.zeros(a.shape, a.dtype)
            else:
                cols = shape[1]
                if cols % n:
                    raise ParallelPlanError(f"tensor parallel: {k} has {cols} columns, not "
                                            f"divisible by {n} ranks")
                s = cols // n
                weights[name] = rd.read(k, cols=(r * s, (r + 1) * s))
        _check_groups(weights, local, quantization, n)
        model = build_model(local, weights, quantization=quantization, dtype=dtype)
    hl = _head_linear(head, quantization, head_src, dtype, cfg.hidden_size, vs)
    return dist.install_tensor_parallel(model, group, hl, V, cfg)


def _check_groups(weights, local, quantization, n):
    """A quantized row-parallel layer splits its input by whole groups."""
    if not quantization:
        return
    for name in weights:
        role = _role(name)
        if role and role == ("row", "scales"):
            path = name.rsplit(".", 1)[0]
            spec = quantization.get(path, quantization)
            gs = int((spec if isinstance(spec, dict) else quantization)["group_size"])
            w = weights[path + ".weight"]
            bits = int((spec if isinstance(spec, dict) else quantization)["bits"])
            cols = w.shape[1] * 32 // bits
            if weights[name].shape[1] * gs != cols:
                raise ParallelPlanError(
                    f"tensor parallel: {path} is quantized in groups of {gs} but its "
                    f"{cols * n} input features do not split into {n} whole-group shards")


# ------------------------------------------------------------- generation ---
#
# Scheme: every rank runs the same engine on the same token ids.  The
# tensor-parallel model gives every rank bit-identical logits (the ring's
# all_sum and all_gather hand each rank the same reduced bytes; the rest of
# the forward is replicated), so greedy decoding -- and sampling from one
# shared seed, chosen by rank 0 and summed into the others -- picks the same
# ids on every rank with no per-token broadcast.  Rank 0 alone prints;
# `checked()` verifies at the end that every rank generated the same ids and
# bounds each step with the distributed deadline (a dead rank ends the run).

def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch,
    mlxcy launch, mpirun)."""
    import os
    e = os.environ
    if "MLX_RANK" in e and (e.get("MLX_HOSTFILE") or e.get("MLX_WORLD_SIZE")):
        return True
    return int(e.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def world_if_launched():
    """The group of all ranks when launched as several (backend from
    MLXCY_DIST_BACKEND, default any), else None."""
    import os
    if not launched():
        return None
    from mlxcy import distributed as dist
    g = dist.init(backend=os.environ.get("MLXCY_DIST_BACKEND", "any"), strict=True)
    return g if g.size > 1 else None


PLANS = ("tensor", "pipeline")


def load_model_for_process(path, dtype=None):
    """The model for this process: split over the launched ranks by the plan
    MLXCY_PARALLEL names (tensor, the default, or pipeline; safetensors
    directories), else the ordinary single-process load."""
    import os
    from mlxcy.models.load import load_model
    g = world_if_launched()
    if g is None:
        return load_model(path, dtype=dtype)
    plan = os.environ.get("MLXCY_PARALLEL", "tensor")
    if plan not in PLANS:
        raise ValueError(f"MLXCY_PARALLEL must be one of {', '.join(PLANS)}, got {plan!r}")
    load = load_tensor_parallel if plan == "tensor" else load_pipeline
    return load(path, g, dtype=dtype)


def shared_seed(group):
    """A sampling seed equal on every rank: rank 0's random draw."""
    import mlxcy.core as core
    import secrets
    from mlxcy import distributed as dist
    mine = secrets.randbits(31) if group.rank == 0 else 0
    return int(dist.all_sum(core.array([mine], core.int32), group).numpy()[0])


def checked(tokens, group, step_timeout=None):
    """Iterate a token stream with each step bounded by the distributed
    deadline; at the end raise when the ranks generated different ids."""
    import mlxcy.core as core
    from mlxcy import distributed as dist
    ids = []
    it = iter(tokens)
    while True:
        with dist.deadline(step_timeout, "a generation step"):
            try:
                tok = next(it)
            except StopIteration:
                break
        ids.append(int(tok.id))
        yield tok
    h = np.array([len(ids), sum((i + 1) * t for i, t in enumerate(ids)) % (1 << 30)], np.int32)
    with dist.deadline(step_timeout, "the final consistency check"):
        hi = dist.all_max(core.array(h), group).numpy()
        lo = dist.all_min(core.array(h), group).numpy()
    if (hi != lo).any():
        raise RuntimeError(f"tensor parallel: the ranks generated different tokens "
                           f"(rank {group.rank}: {len(ids)} ids)")


# ---------------------------------------------------------------- pipeline ---

def pipeline_stages(num_layers: int, n: int):
    """[start, stop) layer ranges of n stages, as equal as they can be (the
    first stages take the extra layers)."""
    if num_layers < n:
        raise ParallelPlanError(f"pipeline parallel: num_hidden_layers = {num_layers} is "
                                f"fewer than the {n} ranks (each stage needs a layer)")
    q, extra = divmod(num_layers, n)
    out, a = [], 0
    for r in range(n):
        b = a + q + (1 if r < extra else 0)
        out.append((a, b))
        a = b
    return out


def load_pipeline(path, group=None, dtype=None):
    """This rank's stage of a pipeline-parallel model over `group`: layers
    pipeline_stages(...)[rank] (read from the checkpoint alone, plus the
    embedding and, on the last rank, the final norm's output head); hidden
    states go from rank r to r+1 (send/recv: the ring's neighbours), the last
    stage's logits to every rank (one all_sum).  Every rank runs the engine
    on the same ids and gets the same logits, as with the tensor plan."""
    import re
    from mlxcy import distributed as dist

    group = dist.world() if group is None else group
    n, r = group.size, group.rank
    cfg, quantization, readers, where, _ = _scan(path, "pipeline")
    l0, l1 = pipeline_stages(cfg.num_hidden_layers, n)[r]
    last = r == n - 1
    lt = list(cfg.layer_types)
    local = cfg.replace(num_hidden_layers=l1 - l0, tie_word_embeddings=True,
                        layer_types=lt[l0:l1] if lt else lt)
    layer = re.compile(r"^(.*\.layers\.)(\d+)\.(.*)$")
    head_src = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    weights, head = {}, {}
    with _reading(readers, weights, head):
        for name, (rd, k) in where.items():
            if name.startswith(head_src + "."):
                if last:
                    head["lm_head." + name.rsplit(".", 1)[1]] = rd.read(k)
                if not cfg.tie_word_embeddings:
                    continue
            m = layer.match(name)
            if m:
                i = int(m.group(2))
                if l0 <= i < l1:
                    weights[f"{m.group(1)}{i - l0}.{m.group(3)}"] = rd.read(k)
                continue
            weights[name] = rd.read(k)
        model = cfg.spec.build(local, weights, quantization, dtype)
    hl = (_head_linear(head, quantization, head_src, dtype, cfg.hidden_size, cfg.vocab_size)
          if last else None)
    return dist.install_pipeline(model, group, list(range(l0, l1)), hl, cfg.vocab_size, cfg)
