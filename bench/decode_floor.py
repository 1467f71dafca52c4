"""Batch-1 decode against the memory-bandwidth floor, at several model sizes (CUDA, bf16).

A batch-1 decode step must read every weight once, so weight bytes / copy bandwidth is its floor.
Small models also pay a fixed cost per kernel, a few microseconds each: this shows how close
minidpo's CUDA-graph decode comes to the floor as the model grows. Random weights, no transformers.

    python bench/decode_floor.py --shapes qwen2-0.5b llama-1b llama-8b [--compile]
"""

import argparse
import statistics
import time

import torch

from minidpo.model import ModelConfig, Transformer
from minidpo.sampler import Sampler

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied
    "qwen2-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                       vocab_size=151936, tie_word_embeddings=True, qkv_bias=True),
    "llama-1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
                     vocab_size=32000),
    "llama-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                     vocab_size=128256),
}
NEW_TOKENS = 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | copy {bandwidth / 1e12:.2f} TB/s | "
          f"bf16 | cuda graphs on | compile {'on' if args.compile else 'off'} | {NEW_TOKENS} tokens, medians of "
          f"{args.repeats}")
    print(f"{'shape':12}{'weights GB':>12}{'floor ms':>10}{'ms/token':>10}{'of floor':>10}")
    for name in args.shapes:
        cfg = ModelConfig(**SHAPES[name], head_dim=SHAPES[name]["hidden_size"] // SHAPES[name]["num_heads"])
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = Transformer(cfg).eval()
        torch.set_default_dtype(torch.float32)
        # Every weight is read once per token; a tied embedding is read by the output projection only.
        weight_bytes = sum(p.numel() for n, p in model.named_parameters() if n != "embed.weight") * 2
        weight_bytes += cfg.vocab_size * cfg.hidden_size * 2  # the output projection
        sampler = Sampler(model, compile=args.compile)
        prompt = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
        mask = torch.ones_like(prompt)

        def run(tokens):
            torch.cuda.synchronize()
            start = time.perf_counter()
            sampler.generate(prompt, mask, max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        run(NEW_TOKENS + 1), run(1)  # warm-up: capture the graph
        per_token = statistics.median((run(NEW_TOKENS + 1) - run(1)) / NEW_TOKENS for _ in range(args.repeats))
        # The copy's read + write rate is what the memory sustains (~3 TB/s on an H100, near its peak).
        floor = weight_bytes / bandwidth
        print(f"{name:12}{weight_bytes / 1e9:12.2f}{floor * 1e3:10.3f}{per_token * 1e3:10.3f}{floor / per_token:10.0%}")
        del model, sampler
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
