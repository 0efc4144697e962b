"""`burnish demo` / `make demo`: the main job on the bundled tiny model."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = ASSETS / "tiny-chat"

DEMO_PROMPTS = [
    "What colour is the sky in Zorbia?",
    "Spell the word apple.",
    "What is 3 plus 4?",
]


def run_demo(args) -> int:
    from .backend import device_info
    from .generation import format_stats, stream_generate
    from .loading import from_pretrained

    info = device_info()
    print(f"burnish demo | MLX {info['mlx_version']} on {info['device']} | BLAS: {info['blas']}")
    model, tokenizer = from_pretrained(TINY_MODEL)
    print(f"loaded the bundled tiny model from {TINY_MODEL}")
    for prompt in DEMO_PROMPTS:
        print(f"\n> {prompt}\n", end="")
        last = None
        messages = [{"role": "user", "content": prompt}]
        for chunk in stream_generate(model, tokenizer, messages, max_new_tokens=48):
            print(chunk.text, end="", flush=True)
            last = chunk
        print()
        if last is not None:
            print(f"  [{format_stats(last)}]")
    return 0
