"""The `burnish` command line: info, generate, demo.

User errors print one line (`burnish: error: ...`) and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
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

    p = sub.add_parser("demo", help="run the demo on the bundled tiny model")
    p.add_argument("--output-dir", default="burnish-demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BurnishError as exc:
        print(f"burnish: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("burnish: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
