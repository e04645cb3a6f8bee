"""`mlxcy lora` and `mlxcy fuse`: command functions and their argparse hook.

Wiring (mlxcy/cli/commands.py, build_parser):  from mlxcy.cli.train import add_parser; add_parser(sub)
Each command is `fn(args) -> int`, set with set_defaults(fn=...), as the others.
"""
from __future__ import annotations

import argparse
import sys

from mlxcy.cli.common import add_dtype

__all__ = ["add_parser", "cmd_lora", "cmd_fuse", "FINE_TUNE_TYPES"]

FINE_TUNE_TYPES = ("lora", "dora", "full")   # mlxcy.train.lora.FINE_TUNE_TYPES


def cmd_lora(args) -> int:
    from mlxcy.train.adapters import load_adapters
    from mlxcy.train.data import load_datasets, load_for_training
    from mlxcy.train.lora import LoRA
    from mlxcy.train.trainer import TrainConfig, train, evaluate
    from mlxcy.train.lora import TrainStep
    from mlxcy.cli.common import UsageError, check_output_dir
    from pathlib import Path
    # every path is checked before the model loads and training runs
    if not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a directory (it must hold train.jsonl "
                         f"and valid.jsonl)")
    if args.resume_adapter_file and not Path(args.resume_adapter_file).is_file():
        raise UsageError(f"--resume-adapter-file {args.resume_adapter_file}: no such file")
    check_output_dir(args.adapter_path, "--adapter-path", allow_existing=True)
    cfg = TrainConfig(iters=args.iters, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, schedule=args.lr_schedule,
                      warmup=args.warmup, min_lr=args.min_lr, grad_accum=args.grad_accum,
                      clip_grad_norm=args.clip_grad_norm, grad_checkpoint=args.grad_checkpoint,
                      compile=args.compile, memory_limit=args.memory_limit,
                      steps_per_report=args.steps_per_report,
                      steps_per_eval=args.steps_per_eval,
                      val_batches=args.val_batches, save_every=args.save_every,
                      adapter_path=args.adapter_path, seed=args.seed,
                      max_seq_length=args.max_seq_length)
    try:
        cfg.check()                  # (and the settings, before the model loads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model, tok, template = load_for_training(args.model, args.dtype)
    ds = load_datasets(args.data, tok, template, mask_prompt=args.mask_prompt,
                       max_seq_length=args.max_seq_length, on_overflow=args.on_overflow,
                       splits=("train", "valid", "test"))
    print(f"Loaded {len(ds['train'])} training examples ({ds['train'].ntokens()} tokens)"
          + (f", {len(ds['valid'])} validation" if ds["valid"] is not None else ""))
    if args.resume_adapter_file:
        from pathlib import Path
        lora = load_adapters(model, Path(args.resume_adapter_file).parent)
    else:
        try:
            lora = LoRA(model, rank=args.rank, scale=args.scale, dropout=args.dropout,
                        keys=args.keys, num_layers=args.num_layers, seed=args.seed,
                        compute_dtype=args.dtype, fine_tune_type=args.fine_tune_type)
        except ValueError as e:
            model.close()
            raise UsageError(f"--fine-tune-type {args.fine_tune_type}: {e}") from None
    what = "tensors" if lora.fine_tune_type == "full" else f"{lora.fine_tune_type.upper()} adapters"
    print(f"Trainable parameters: {lora.nparams():,} in {len(lora)} {what}")
    train(model, lora, ds["train"], ds["valid"], cfg, resume=args.resume,
          extra_config={"model": str(args.model), "data": str(args.data)})
    if args.test and ds["test"] is not None:
        loss, ppl, _ = evaluate(TrainStep(lora, None), ds["test"], args.batch_size,
                                args.test_batches, args.max_seq_length)
        print(f"Test loss {loss:.3f}, Test ppl {ppl:.3f}.")
    model.close()
    return 0


def cmd_fuse(args) -> int:
    from pathlib import Path
    from mlxcy.cli.common import UsageError, check_output_dir
    from mlxcy.train.adapters import fuse_model, read_adapter_config
    if not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    read_adapter_config(args.adapter_path)      # a missing or bad adapter dir fails first
    check_output_dir(args.save_path, "--save-path", force=args.force)
    out = fuse_model(args.model, args.adapter_path, args.save_path,
                     dequantize=args.dequantize, dtype=args.dtype)
    print(f"Saved fused model to {out}")
    return 0


def _memory_limit(text):
    """--memory-limit: auto | off | a size in GB -> TrainStep's memory_limit."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a size in GB, got {text!r}")
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"the size must be > 0 GB, got {text!r}")
    return int(gb * 1e9)


def add_parser(subparsers, formatter_class=None) -> None:
    """Register `lora` and `fuse` on an argparse subparsers object."""
    kw = {"formatter_class": formatter_class} if formatter_class else {}
    t = subparsers.add_parser("lora", help="LoRA, DoRA or full fine-tuning (mlx-lm's data "
                                           "and adapter formats)",
                              description="LoRA fine-tuning on mlx-lm's train.jsonl / "
                                          "valid.jsonl; adapters in mlx-lm's format.", **kw)
    t.add_argument("--model", required=True, help="model directory or .gguf file")
    t.add_argument("--data", required=True, help="directory with train.jsonl, valid.jsonl "
                                                 "(and test.jsonl for --test)")
    t.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, default="lora",
                   help="lora: low-rank adapters; dora: LoRA plus a learned magnitude per "
                        "output (DoRA); full: every tensor of the top --num-layers blocks "
                        "(float models only; --rank/--scale/--dropout/--keys unused)")
    t.add_argument("--iters", type=int, default=100, help="optimizer updates")
    t.add_argument("--batch-size", type=int, default=4, help="examples per step")
    t.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate")
    t.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw",
                   help="optimizer")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    t.add_argument("--lr-schedule", "--schedule", dest="lr_schedule",
                   choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule after the warmup")
    t.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    t.add_argument("--min-lr", type=float, default=0.0, help="final learning rate of a decay")
    t.add_argument("--rank", type=int, default=8, help="adapter rank")
    t.add_argument("--scale", type=float, default=20.0,
                   help="adapter scale (alpha / rank in PEFT's terms)")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's input")
    t.add_argument("--keys", default="q_proj,v_proj",
                   help="target modules, comma-separated: q_proj k_proj v_proj o_proj "
                        "gate_proj up_proj down_proj")
    t.add_argument("--num-layers", type=int, default=16, help="adapt the top N blocks (-1: all)")
    t.add_argument("--max-seq-length", type=int, default=2048,
                   help="longest example in tokens")
    t.add_argument("--on-overflow", choices=("truncate", "error"), default="truncate",
                   help="what to do with an example longer than --max-seq-length")
    t.add_argument("--mask-prompt", action="store_true",
                   help="train only on completions / the last chat message")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="batches whose gradients are averaged per update")
    t.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="clip the gradients' global norm to this (0: off)")
    t.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    t.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the training step uncompiled (a compiled step's first call per "
                        "batch shape builds its kernels: up to a minute on a GPU's empty "
                        "kernel cache)")
    t.add_argument("--memory-limit", type=_memory_limit, default="auto",
                   help="auto (default), off, or GB: bounds the memory of GPU command batches "
                        "in flight during a step (TrainStep's memory_limit)")
    t.add_argument("--dtype", default=None,
                   help="model/activation dtype, e.g. bfloat16 (adapters and optimizer "
                        "state stay float32)")
    t.add_argument("--steps-per-report", type=int, default=10,
                   help="print the training loss every N updates")
    t.add_argument("--steps-per-eval", type=int, default=200,
                   help="validate every N updates (0: only at the end)")
    t.add_argument("--val-batches", type=int, default=25,
                   help="validation batches per evaluation (-1: the whole set)")
    t.add_argument("--save-every", type=int, default=100,
                   help="save the adapters every N updates (0: only at the end)")
    t.add_argument("--adapter-path", default="adapters",
                   help="directory for the adapters and the training state")
    t.add_argument("--resume", action="store_true",
                   help="continue from the training state in --adapter-path")
    t.add_argument("--resume-adapter-file", default=None,
                   help="start from these adapters (an adapters.safetensors in a directory "
                        "with its adapter_config.json)")
    t.add_argument("--test", action="store_true", help="evaluate on test.jsonl at the end")
    t.add_argument("--test-batches", type=int, default=500,
                   help="test batches for --test (-1: all)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the adapters' initialisation and the batch order")
    t.set_defaults(fn=cmd_lora)

    f = subparsers.add_parser("fuse", help="fold LoRA/DoRA adapters (or fully fine-tuned "
                                           "layers) into a model and save it",
                              description="Fold LoRA/DoRA adapters or fully fine-tuned layers "
                                          "into a model and save a model "
                                          "directory (a GGUF base's tokenizer is written too).",
                              **kw)
    f.add_argument("--model", required=True, help="the base model: directory or .gguf file")
    f.add_argument("--adapter-path", default="adapters",
                   help="directory with adapters.safetensors and adapter_config.json")
    f.add_argument("--save-path", default="fused_model",
                   help="output directory (must not exist, or be empty, unless --force)")
    f.add_argument("--force", action="store_true",
                   help="overwrite an existing, non-empty --save-path")
    f.add_argument("--dequantize", action="store_true",
                   help="write float weights even for a quantized base")
    add_dtype(f, "dtype of the float weights written (default: the base's)")
    f.set_defaults(fn=cmd_fuse)


def main(argv=None) -> int:
    """Stand-alone entry: python -m mlxcy.cli.train lora|fuse ..."""
    p = argparse.ArgumentParser(prog="mlxcy")
    add_parser(p.add_subparsers(dest="command", required=True))
    from mlxcy.cli.common import run
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
