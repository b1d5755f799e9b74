"""Generation speed with and without the KV cache: tokens/s of each and their ratio.

    python bench/generate.py                      # tiny config, CPU or the GPU if present
    python bench/generate.py --config 125M --device cuda --dtype bf16 --tokens 512

The model is randomly initialised (speed does not depend on the weights) and decodes greedily,
so both runs produce the same number of tokens, and the same tokens, which is checked. By
default prompt plus new tokens fill the context exactly, the longest run the cache serves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from pipeline.config.schema import ModelConfig
from pipeline.generation import generate
from pipeline.model import GPT

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model_config(name_or_path: str) -> ModelConfig:
    """A model config by size name (`tiny`, `125M`, ...) or by path to its YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = ROOT / "configs" / "model_configs" / f"{name_or_path}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return ModelConfig(**data["model"])


def timed_generate(
    model: GPT, prompt: list[int], tokens: int, use_cache: bool
) -> tuple[float, list[int]]:
    """Seconds to generate `tokens` new tokens greedily, and the tokens."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = generate(model, prompt, tokens, temperature=0.0, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="size name or model config YAML")
    parser.add_argument("--vocab_size", type=int, default=50257, help="default: GPT-2's BPE")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=None, help="default: n_ctx - prompt_len")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = load_model_config(args.config)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    tokens = args.tokens if args.tokens is not None else config.n_ctx - args.prompt_len
    torch.manual_seed(args.seed)
    model = GPT(config, args.vocab_size).to(device=device, dtype=DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()

    print(
        f"config {config.name}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"n_ctx {config.n_ctx}, vocab {args.vocab_size}; device {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{args.dtype}, {torch.get_num_threads()} CPU threads"
    )
    print(f"prompt {args.prompt_len} tokens, {tokens} new tokens, greedy, best of {args.repeats}")
    timed_generate(model, prompt, min(tokens, 8), use_cache=True)  # warm-up: kernels, allocator
    timed_generate(model, prompt, min(tokens, 8), use_cache=False)
    results: dict[bool, tuple[float, list[int]]] = {}
    for use_cache in (True, False):
        runs = [timed_generate(model, prompt, tokens, use_cache) for _ in range(args.repeats)]
        results[use_cache] = min(runs, key=lambda r: r[0])
    cached_s, cached_out = results[True]
    uncached_s, uncached_out = results[False]
    print(f"with KV cache:    {tokens / cached_s:10.1f} tokens/s  ({cached_s:.3f} s)")
    print(f"without KV cache: {tokens / uncached_s:10.1f} tokens/s  ({uncached_s:.3f} s)")
    print(f"speed-up: {uncached_s / cached_s:.2f}x; same tokens: {cached_out == uncached_out}")


if __name__ == "__main__":
    main()
