"""The LoRA training loop: batches, native steps, progress, validation,
periodic checkpoints and resume.

    cfg = TrainConfig(iters=200, batch_size=4, learning_rate=1e-4)
    history = train(model, lora, datasets["train"], datasets["valid"], cfg)

Checkpoints go to cfg.adapter_path: adapters.safetensors (latest),
NNNNNNN_adapters.safetensors every save_every steps (mlx-lm's names),
adapter_config.json, and training_state.{json,safetensors} (step and the
optimizer's moments) from which resume=True continues exactly where it left off:
the batch order is a pure function of (seed, epoch), so the resumed run sees the
same batches as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainConfig", "train", "evaluate", "make_optimizer"]


@dataclass
class TrainConfig:
    iters: int = 100                 # optimizer updates
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adamw"         # adamw | adam | sgd
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    momentum: float = 0.0            # sgd
    schedule: str = "constant"       # constant | linear | cosine
    warmup: int = 0
    min_lr: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float = 0.0      # 0: no clipping
    grad_checkpoint: bool = False
    compile: bool = True             # TrainStep(compile=...): never with LoRA dropout
    memory_limit: object = "auto"    # TrainStep(memory_limit=...): "auto", bytes, or None
    steps_per_report: int = 10
    steps_per_eval: int = 200        # 0: only at the end
    val_batches: int = 25            # -1: the whole validation set
    save_every: int = 100            # 0: only at the end
    adapter_path: str | None = "adapters"
    seed: int = 0
    max_seq_length: int = 2048
    pad_to: int = 8

    def as_dict(self):
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise ValueError naming the first field out of range: before any
        step, where a zero batch or report interval divided by zero and a NaN
        learning rate surfaced as a NaN loss some iterations in."""
        def need(name, ok, want):
            v = getattr(self, name)
            if not ok(v):
                raise ValueError(f"{name} must be {want}, got {v!r}")
        is_int = lambda v: type(v) is int          # noqa: E731  (not bool, not float)
        finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v)                   # noqa: E731
        for name in ("iters", "batch_size", "steps_per_report", "pad_to", "grad_accum"):
            need(name, lambda v: is_int(v) and v >= 1, "an int >= 1")
        for name in ("steps_per_eval", "save_every", "warmup"):
            need(name, lambda v: is_int(v) and v >= 0, "an int >= 0")
        need("val_batches", lambda v: is_int(v) and v >= -1, "an int >= -1 (-1: all)")
        need("max_seq_length", lambda v: is_int(v) and v >= 2, "an int >= 2")
        for name in ("learning_rate", "min_lr", "weight_decay", "momentum", "clip_grad_norm"):
            need(name, lambda v: finite(v) and v >= 0, "a finite number >= 0")
        need("betas", lambda v: len(v) == 2 and all(finite(b) and 0 <= b < 1 for b in v),
             "two numbers in [0, 1)")


def make_optimizer(cfg: TrainConfig):
    from mlxcy.train.optim import AdamW, Adam, SGD, make_schedule
    lr = make_schedule(cfg.schedule, cfg.learning_rate, cfg.iters, cfg.warmup, cfg.min_lr)
    name = cfg.optimizer.lower()
    if name == "adamw":
        return AdamW(lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adam":
        return Adam(lr, betas=tuple(cfg.betas), weight_decay=0.0)
    if name == "sgd":
        return SGD(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, adam, sgd)")


def evaluate(step, dataset, batch_size, num_batches=-1, max_len=None, pad_to=8,
             desc="validating"):
    """(mean token loss, perplexity, tokens) over the first num_batches batches
    (a progress bar on a terminal)."""
    from mlxcy import _progress
    from mlxcy.train.data import iterate_batches
    total, ntoks = 0.0, 0
    nb = -(-len(dataset) // batch_size)
    bar = _progress.bar(total=nb if num_batches < 0 else min(nb, num_batches), desc=desc,
                        unit="batch", leave=False)
    for i, (ids, off, ln) in enumerate(iterate_batches(dataset, batch_size, shuffle=False,
                                                       pad_to=pad_to, max_len=max_len)):
        if 0 <= num_batches <= i:
            break
        s, n = step.evaluate(ids, off, ln)
        total += s
        ntoks += n
        bar.update(1)
    bar.close()
    if ntoks == 0:
        raise ValueError("evaluate: no trained tokens in the validation data")
    loss = total / ntoks
    return loss, math.exp(min(loss, 700.0)), ntoks


def _save_state(d: Path, step_obj, it):
    from mlxcy.models.load import save_safetensors
    opt = step_obj.optimizer.state_dict()
    tensors = {f"m.{i}": a for i, a in enumerate(opt["m"])}
    tensors.update({f"v.{i}": a for i, a in enumerate(opt["v"])})
    if tensors:
        save_safetensors(d / "training_state.safetensors", tensors)
    (d / "training_state.json").write_text(json.dumps(
        {"iteration": it, "optimizer_step": opt["step"], "n": len(opt["m"])}))


def _state_meta(p: Path) -> dict:
    """training_state.json, checked: "iteration", "optimizer_step" and "n" (the
    optimizer's moment tensors) are ints >= 0."""
    from mlxcy.errors import AdapterError
    from mlxcy.json_files import read_json_object
    meta = read_json_object(p, AdapterError)
    for k in ("iteration", "optimizer_step", "n"):
        if type(meta.get(k)) is not int or meta[k] < 0:
            raise AdapterError(f"{p}: {k!r} must be an int >= 0, got {meta.get(k)!r}")
    return meta


def _load_state(d: Path, step_obj):
    from mlxcy.errors import AdapterError
    from mlxcy.models.load import read_safetensors
    meta = _state_meta(d / "training_state.json")
    n = meta["n"]
    if n:
        t, _ = read_safetensors(d / "training_state.safetensors")
        want = [f"{k}.{i}" for k in "mv" for i in range(n)]
        missing = [k for k in want if k not in t]
        if missing:
            raise AdapterError(f"{d / 'training_state.safetensors'}: no tensor {missing[0]!r} "
                               f"(training_state.json gives n = {n})")
        step_obj.optimizer.load_state_dict({"step": meta["optimizer_step"],
                                            "m": [t[f"m.{i}"] for i in range(n)],
                                            "v": [t[f"v.{i}"] for i in range(n)]})
    return meta["iteration"]


def _fmt_report(it, loss, lr, tps, peak, its):
    return (f"Iter {it}: train loss {loss:.3f}, learning rate {lr:.3e}, it/s {its:.3f}, "
            f"tokens/s {tps:.1f}, peak mem {peak / 1e9:.3f} GB")


def train(model, lora, train_set, val_set=None, cfg: TrainConfig | None = None,
          optimizer=None, report=print, resume=False, extra_config=None):
    """Train `lora` (a mlxcy.train.lora.LoRA on `model`) for cfg.iters updates.
    Returns {"train": [(it, loss, tokens/s)], "val": [(it, loss, ppl)]}."""
    from mlxcy.memory import get_peak_memory, reset_peak_memory
    from mlxcy.train.adapters import save_adapters
    from mlxcy.train.data import iterate_batches
    from mlxcy.train.lora import TrainStep
    cfg = cfg or TrainConfig()
    cfg.check()
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training set has {len(train_set)} examples, fewer than the "
                         f"batch size {cfg.batch_size}")
    opt = optimizer or make_optimizer(cfg)
    step = TrainStep(lora, opt, grad_checkpoint=cfg.grad_checkpoint,
                     clip_grad_norm=cfg.clip_grad_norm, grad_accum=cfg.grad_accum,
                     compile=cfg.compile, memory_limit=cfg.memory_limit)
    out = Path(cfg.adapter_path) if cfg.adapter_path else None
    meta = dict(extra_config or {})
    meta.update({k: v for k, v in cfg.as_dict().items() if k not in meta})
    start = 0
    if resume:
        if out is None or not (out / "training_state.json").is_file():
            raise FileNotFoundError(f"resume: no training state in {out}")
        from mlxcy.models.load import read_safetensors
        w, _ = read_safetensors(out / "adapters.safetensors")
        lora.set_parameters(w)
        start = _load_state(out, step)
        report(f"Resuming from iteration {start}")
    batches = iterate_batches(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, loop=True,
                              pad_to=cfg.pad_to, max_len=cfg.max_seq_length)
    for _ in range(start * cfg.grad_accum):
        next(batches)
    hist = {"train": [], "val": []}
    from mlxcy import _progress
    bar = _progress.bar(total=cfg.iters, initial=start, desc="training", unit="it")
    if not bar.disable and report is print:
        report = bar.write          # report lines above the bar

    def validate(it):
        if val_set is None:
            return
        t0 = time.perf_counter()
        loss, ppl, _ = evaluate(step, val_set, cfg.batch_size, cfg.val_batches,
                                cfg.max_seq_length, cfg.pad_to)
        hist["val"].append((it, loss, ppl))
        report(f"Iter {it}: val loss {loss:.3f}, val ppl {ppl:.3f}, "
               f"val took {time.perf_counter() - t0:.3f}s")

    def save(it):
        if out is None:
            return
        save_adapters(lora, out, meta)
        save_adapters(lora, out, meta, filename=f"{it:07d}_adapters.safetensors")
        _save_state(out, step, it)

    if start == 0 and cfg.steps_per_eval > 0:
        validate(0)
    reset_peak_memory()
    losses, ntoks, t0 = 0.0, 0, time.perf_counter()
    nsteps = 0
    it = start
    while it < cfg.iters:
        ids, off, ln = next(batches)
        lr = opt.lr
        loss, n, updated = step.step(ids, off, ln)
        if not math.isfinite(loss):
            raise FloatingPointError(f"iteration {it + 1}: the loss is {loss}")
        losses += loss
        ntoks += n
        nsteps += 1
        if not updated:
            continue
        it += 1
        dt_bar = time.perf_counter() - t0
        bar.set_postfix(loss=f"{losses / nsteps:.3f}", tok_s=f"{ntoks / max(dt_bar, 1e-9):.0f}",
                        refresh=False)
        bar.update(1)
        if it % cfg.steps_per_report == 0 or it == cfg.iters:
            dt = time.perf_counter() - t0
            mean = losses / nsteps
            tps = ntoks / dt
            hist["train"].append((it, mean, tps))
            report(_fmt_report(it, mean, lr, tps, get_peak_memory(),
                               (nsteps / cfg.grad_accum) / dt))
            losses, ntoks, nsteps, t0 = 0.0, 0, 0, time.perf_counter()
        if cfg.steps_per_eval > 0 and it % cfg.steps_per_eval == 0 and it != cfg.iters:
            validate(it)
        if cfg.save_every > 0 and it % cfg.save_every == 0 and it != cfg.iters:
            save(it)
    bar.close()
    validate(it)
    save(it)
    lora.eval()
    if out is not None:
        report(f"Saved final adapters to {out / 'adapters.safetensors'}")
    return hist
