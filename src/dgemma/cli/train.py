"""`dgemma train` and `dgemma train merge`: the command line over `dgemma.train`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from ..config import PRESETS
from ..train.config import DEFAULT_MODEL, DTYPES, FSDP_DTYPES, TrainConfig
from ..train.objective import WEIGHTINGS
from .common import CLIError, pick_device

EPILOG = """\
inputs: text files and folders (one document per file; --ext filters what a folder walk finds) and JSONL
files (.jsonl, or .json whose first line is a record) with {"text"}, {"prompt", "completion"} (loss on the
completion) or {"messages"} (chat; loss on the final assistant message). Examples are packed into --seq-len
rows unless --no-pack.

output: OUT/checkpoint-STEP/ (Hugging Face layout, loadable by `dgemma generate --model`; with --lora the
adapter and tokenizer: `dgemma train merge` or --merge makes a loadable model), OUT/metrics.jsonl,
OUT/loss_curve.png. Ctrl-C saves a checkpoint; --resume continues exactly.

several processes: torchrun --nproc_per_node 2 -m dgemma train ... (the global --batch-size is split).
Sharded (--fsdp: weights, gradients and optimizer state split over the processes): torchrun ... --fsdp; its
checkpoints are sharded (any number of processes resumes them); `dgemma train export` or --export writes the
Hugging Face layout. See docs/sharded-training.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train or fine-tune a model (diffusion + AR loss)",
                       description="Train DiffusionGemma: the decoder denoises a corrupted canvas of each example "
                                   "and the encoder learns next-token prediction, with shared weights.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = t.add_argument_group("data")
    data.add_argument("--data", action="extend", nargs="+", metavar="PATH",
                      help="files, folders or JSONL files (a shell glob works; repeatable)")
    data.add_argument("--ext", action="append", metavar="EXT", help="only files ending in EXT in folders (e.g. .py)")
    data.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per row (default 512)")
    data.add_argument("--no-pack", dest="pack", action="store_false",
                      help="one example per row (padded) instead of packing")
    data.add_argument("--eval-data", action="extend", nargs="+", default=[], metavar="PATH",
                      help="inputs held out for evaluation (never trained on, even if --data includes them)")
    data.add_argument("--holdout-frac", type=float, default=0.01, metavar="F",
                      help="fraction of --data files/examples held out too, by hash (default 0.01)")
    model = t.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR_OR_PRESET",
                       help=f"checkpoint to start from, or a preset with random weights ({', '.join(PRESETS)}; "
                            f"default {DEFAULT_MODEL})")
    model.add_argument("--config-json", metavar="FILE", help="random weights for this config.json instead of --model")
    model.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (a random model takes its vocab size)")
    model.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R LoRA adapters only")
    model.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 2R)")
    model.add_argument("--merge", action="store_true", help="with --lora: also write OUT/merged, a full checkpoint")
    model.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="with --lora: dtype of the frozen base weights (bfloat16 halves their memory; the "
                            "adapters train in float32; default float32)")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000, metavar="N", help="optimizer steps (default 1000)")
    opt.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per step, all processes (default 8)")
    opt.add_argument("--accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    opt.add_argument("--warmup", type=int, default=100, metavar="N", help="warmup steps (default 100)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, metavar="W", help="AdamW weight decay (default 1e-4)")
    opt.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    opt.add_argument("--grad-checkpoint", action="store_true",
                     help="recompute each layer's activations in the backward pass: less memory for long rows, "
                          "about a third more compute, the same gradients")
    opt.add_argument("--weighting", choices=WEIGHTINGS, default="unweighted",
                     help="diffusion loss weight per example: none, 1/(1-t) or 1/t (ELBO) (default unweighted)")
    opt.add_argument("--diffusion-weight", type=float, default=1.0, metavar="W",
                     help="weight of the diffusion (decoder) loss (default 1); 0: an AR-only baseline, the decoder "
                          "is not run")
    opt.add_argument("--ar-weight", type=float, default=1.0, metavar="W", help="weight of the AR loss (default 1)")
    opt.add_argument("--infill-prob", type=float, default=0.0, metavar="P",
                     help="fraction of canvases laid out as infills: [span, <|fill|> x (hole - span)] then the "
                          "fixed suffix, as `dgemma eval` infills (default 0)")
    run = t.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output directory")
    run.add_argument("--eval-every", type=int, default=200, metavar="N", help="held-out loss every N steps")
    run.add_argument("--save-every", type=int, default=500, metavar="N", help="checkpoint every N steps")
    run.add_argument("--log-every", type=int, default=10, metavar="N", help="plain progress line every N steps "
                                                                             "(without tqdm)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    run.add_argument("--device", help="torch device (default: cuda if available)")
    sharding = t.add_argument_group("sharded training (FSDP, under torchrun)")
    sharding.add_argument("--fsdp", action="store_true",
                          help="shard weights, gradients and optimizer state over the processes (torchrun; nccl on "
                               "CUDA, gloo on the CPU); checkpoints are sharded too")
    sharding.add_argument("--fsdp-dtype", choices=FSDP_DTYPES, metavar="DTYPE",
                          help="dtype the gathered weights compute in (bfloat16 or float32; default bfloat16 on "
                               "CUDA, float32 on the CPU); gradients are reduced and weights kept in float32")
    sharding.add_argument("--fsdp-offload", action="store_true",
                          help="keep the weight shards, their gradients and the optimizer state in CPU memory")
    sharding.add_argument("--export", action="store_true",
                          help="with --fsdp: also write OUT/export, the final model in the Hugging Face layout")
    sharding.add_argument("--plan", action="store_true",
                          help="print the memory per process of this setup (parameters, gradients, optimizer "
                               "state, activations at --batch-size x --seq-len) and of others, and which fit an "
                               "80 GB GPU, from the model's config alone; trains nothing")
    sharding.add_argument("--world-size", type=int, metavar="N",
                          help="with --plan: the number of processes (default: torchrun's WORLD_SIZE, else 1)")
    t.set_defaults(func=cmd_train)

    actions = t.add_subparsers(dest="train_command", title="actions", metavar="{merge,export}")
    m = actions.add_parser("merge", help="fold a LoRA adapter into its base model",
                           description="Write a full checkpoint: the base model with the adapter merged in.")
    m.add_argument("adapter", metavar="ADAPTER_DIR", help="a checkpoint directory of a --lora run")
    m.add_argument("--out", required=True, metavar="DIR", help="output directory")
    m.add_argument("--base", metavar="DIR", help="base model (default: the one recorded in the adapter)")
    m.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype the base is loaded, merged and written in (default float32)")
    m.set_defaults(func=cmd_merge)
    e = actions.add_parser("export", help="write a sharded (--fsdp) checkpoint in the Hugging Face layout",
                           description="Gather the shards of a `dgemma train --fsdp` checkpoint into one model "
                                       "directory (safetensors, config, tokenizer) that dgemma generate, transformers "
                                       "and vLLM load. One process; needs the whole model's memory.")
    e.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="OUT/checkpoint-STEP of a --fsdp run")
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights (default float32)")
    e.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.loop import train

    if args.world_size is not None and not args.plan:
        raise CLIError("--world-size needs --plan (a run's processes are the ones torchrun starts)")
    if args.plan:
        return _plan(args)
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise CLIError(f"train needs {' and '.join(missing)}")
    if args.device is not None:
        pick_device(args.device)
    cfg = _train_config(args)
    main_process = os.environ.get("RANK", "0") == "0"
    logger = logging.getLogger("dgemma.train")
    level = logger.level
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    try:
        checkpoint = train(cfg)
    finally:
        logger.setLevel(level)
    if main_process:
        print(checkpoint)
    return 0


def _train_config(args: argparse.Namespace) -> TrainConfig:
    # the options are named after TrainConfig's fields; the rest keep their defaults
    names = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
    return TrainConfig(**{name: getattr(args, name) for name in names})


def cmd_merge(args: argparse.Namespace) -> int:
    from ..shipped import resolve
    from ..train.base import load_base
    from ..train.lora import adapter_base, attach_adapter, merge_lora

    adapter = Path(args.adapter)
    recorded = adapter_base(adapter)
    base = args.base or recorded
    if base is None:
        raise CLIError(f"{adapter}: the adapter names no base model; pass --base DIR")
    try:
        kind, _ = resolve(base)
    except FileNotFoundError:
        if args.base:
            raise
        raise CLIError(f"{adapter}: the base model it was trained on, {base}, is not there: "
                       "pass --base DIR") from None
    if kind == "preset":
        trained_on = f" ({recorded})" if recorded else ""
        raise CLIError(f"--base {base} is a preset of random weights, not a trained model: pass --base DIR, the "
                       f"checkpoint the adapter was trained on{trained_on}")
    has_tokenizer = (adapter / "tokenizer.json").is_file()  # the training run's (adapters saved before had none)
    model = load_base(base, tokenizer_dir=str(adapter) if has_tokenizer else None, dtype=args.dtype)
    attach_adapter(model.model, adapter, base)
    merge_lora(model.model)
    model.save_pretrained(args.out)
    print(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..train.sharded_checkpoint import export

    print(export(Path(args.checkpoint), Path(args.out), args.dtype))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ..train.base import base_config
    from ..train.plan import Setup, format_plan

    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise CLIError(f"--world-size must be >= 1, got {world}")
    _train_config(args).validate(world)  # the settings a run with them would refuse
    on_cpu = args.device is not None and args.device.startswith("cpu")
    compute = args.fsdp_dtype or ("float32" if on_cpu else "bfloat16")
    setup = Setup(world, args.fsdp, args.fsdp_offload, args.lora, args.dtype, compute, args.batch_size, args.seq_len,
                  args.accum, args.grad_checkpoint)
    name = args.config_json or args.model
    print(format_plan(base_config(args.model, args.config_json), name, setup))
    return 0
