"""Training throughput: tokens/s and MFU of the project's own training step.

    python bench/train.py                                   # tiny, fp32, CPU
    python bench/train.py --model_size 125M --precision bf16 --micro_batch 16 --seq_len 1024 \
        --compile --steps 20                                # a GPU row of ../shared/gpu/README.md

Random tokens in a synthetic prepared folder (vocabulary 50304 for GPT-3 shapes, as the
reference figures use), the real `Trainer.train_step` (autocast, loss scaling, accumulation,
clipping, fused AdamW on CUDA). Prints one row per run: tokens/s, MFU, step time, peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config.loader import load_config
from pipeline.data.prepared import META_FILE, PreparedMeta
from pipeline.training.throughput import device_peak_tflops, mfu
from pipeline.training.trainer import Trainer


def synthetic_prepared(folder: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """train.bin/val.bin of uniform random tokens plus a meta.json that the loaders accept."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    splits = {}
    for split, count in (("train", tokens), ("val", max(tokens // 10, 4096))):
        rng.integers(0, vocab, count, dtype=np.int64).astype(dtype).tofile(folder / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "documents": 1, "tokens": count, "text_bytes": 0}
    meta = PreparedMeta(
        data_hash="synthetic",
        vocab_size=vocab,
        dtype=dtype,
        eot_id=0,
        tokenizer={"kind": "bpe", "file": "tokenizer.json"},
        seed=seed,
        val_fraction=0.1,
        source="synthetic",
        splits=splits,
        empty_documents_skipped=0,
        inputs=[],
        outputs={},
    )
    (folder / META_FILE).write_text(meta.model_dump_json(indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="default: 4096 tiny, 50304 GPT-3")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    vocab = args.vocab or (4096 if args.model_size == "tiny" else 50304)
    batch = args.micro_batch * args.accumulation
    with tempfile.TemporaryDirectory() as tmp:
        needed = (args.steps + args.warmup + 1) * batch * args.seq_len + 1
        prepared = synthetic_prepared(Path(tmp) / "prepared", vocab, max(needed, 100_000))
        config = load_config(
            model_size=args.model_size,
            overrides={
                "data.prepared_dir": str(prepared),
                "output_dir": str(Path(tmp) / "run"),
                "training.precision": args.precision,
                "training.micro_batch_size": args.micro_batch,
                "training.global_batch_size": batch,
                "training.global_batch_tokens": None,
                "training.seq_len": args.seq_len,
                "training.max_steps": args.steps + args.warmup,
                "training.device": args.device,
                "training.compile": args.compile,
                "training.gradient_checkpointing": args.gradient_checkpointing,
                "tracking.enabled": False,
            },
        )
        trainer = Trainer(config)
        device = trainer.parts.device
        for _ in range(args.warmup):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            metrics = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    tokens_per_s = args.steps * batch * args.seq_len / seconds
    peak = device_peak_tflops(device, config.training.peak_tflops)
    utilisation = mfu(tokens_per_s, trainer.parts.flops_per_token, peak)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(
        f"{args.model_size:>5} {args.precision} seq {args.seq_len} x micro {args.micro_batch} "
        f"x accum {args.accumulation} on {device}: {tokens_per_s:,.0f} tokens/s, "
        f"MFU {'n/a' if utilisation is None else f'{utilisation:.1%}'}, "
        f"{seconds / args.steps * 1000:.0f} ms/step, peak memory {memory:.1f} GiB, "
        f"final loss {metrics['train/loss']:.3f}"
    )


if __name__ == "__main__":
    main()
