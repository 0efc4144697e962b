"""The `burnish` command line: info, generate, train, export, demo.

User errors print one line (`burnish: error: ...`) and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import BurnishError

EXIT_USER_ERROR = 2


def cmd_info(args) -> int:
    from .backend import device_info

    for key, value in device_info().items():
        if value:
            print(f"{key:12s} {value}")
    return 0


def cmd_generate(args) -> int:
    from .generation import format_stats, stream_generate
    from .loading import from_pretrained

    model, tokenizer = from_pretrained(args.model, dtype=args.dtype)
    prompt = args.prompt
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
    last = None
    for chunk in stream_generate(model, tokenizer, prompt, max_new_tokens=args.max_tokens,
                                 temperature=args.temp, top_p=args.top_p, seed=args.seed):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    if last is not None:
        print(format_stats(last), file=sys.stderr)
    return 0


def _take_nproc(overrides, nproc):
    """`--nproc N` may also come after the config file (among the overrides)."""
    rest, i = [], 0
    while i < len(overrides):
        flag = overrides[i]
        if flag == "--nproc" or flag.startswith("--nproc="):
            value = flag.partition("=")[2] or (overrides[i + 1] if i + 1 < len(overrides) else "")
            i += 1 if "=" in flag else 2
            nproc = value
        else:
            rest.append(flag)
            i += 1
    try:
        nproc = int(nproc)
    except (TypeError, ValueError):
        nproc = 0
    if nproc < 1:
        raise BurnishError("command line: --nproc expects an integer >= 1")
    return rest, nproc


def cmd_train(args) -> int:
    from .distributed import launch_local, rank_process
    from .runconfig import load_run_config, run
    from .trainer import TrainingConfig

    overrides, nproc = _take_nproc(args.overrides, args.nproc)
    # `--resume` may also come after the config file (among the overrides).
    resume = args.resume or "--resume" in overrides
    overrides = [o for o in overrides if o != "--resume"]
    config = load_run_config(args.config, overrides)
    output_dir = config.training.get("output_dir", TrainingConfig.output_dir)
    if nproc > 1:  # N ranks on this machine through mlx.launch (ring on loopback)
        return launch_local(args.config, overrides + ["--resume"] * resume, nproc,
                            output_dir)
    with rank_process(output_dir) as world:  # records the status of a launched rank
        metrics = run(config, resume=resume)
    if world.is_main:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()))
    return 0


def cmd_export(args) -> int:
    from .export import export_gguf, load_adapters, save_merged
    from .loading import from_pretrained

    if not (args.out or args.gguf):
        raise BurnishError("export: give --out FOLDER (merged model) and/or --gguf FILE")
    model, tokenizer = from_pretrained(args.model)
    if args.adapters:
        load_adapters(model, args.adapters)
    if args.out:
        print(f"merged model: {save_merged(model, tokenizer, args.out, dtype=args.dtype, dequantize=args.dequantize)}")
    if args.gguf:
        print(f"gguf: {export_gguf(model, tokenizer, args.gguf)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="burnish", description="Fine-tune and run language models on MLX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="MLX version, device, BLAS in use")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="stream text from a model")
    p.add_argument("--model", required=True, help="model folder or cached hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="cast weights (default: keep checkpoint)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="fine-tune from a YAML run file")
    p.add_argument("--nproc", default=1,
                   help="data-parallel ranks on this machine, launched with mlx.launch")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir")
    p.add_argument("config", help="YAML with sections model, peft, data, training")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="--section.key VALUE pairs that override the file")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="merge adapters into a model folder and/or GGUF")
    p.add_argument("--model", required=True, help="base model folder")
    p.add_argument("--adapters", help="adapter folder (mlx-lm layout)")
    p.add_argument("--out", help="write a merged Hugging Face folder here")
    p.add_argument("--gguf", help="write a GGUF file here (llama-family models)")
    p.add_argument("--dtype", default=None, help="cast the merged weights")
    p.add_argument("--dequantize", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="run the demo on the bundled tiny model")
    p.add_argument("--output-dir", default="burnish-demo")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the demo's training steps (for a quick look)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    # transformers' advisory notes (e.g. "PyTorch was not found") are noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BurnishError as exc:
        print(f"burnish: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("burnish: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
