"""fp32 matmul paths on this CPU: oneDNN against MKL on SmolLM2-135M's products, per shape class.

minidpo.cpu.linear times both paths on each shape class's first products and keeps the faster
(MINIDPO_CPU_MATMUL=auto). This script shows what that choice rests on: for each layer of
SmolLM2-135M (hidden 576; q/k/v fused 960, gate/up fused 3072, down 1536 -> 576, vocabulary 49152)
at 1 row (batch-1 decode), 32 rows (the sampler's 16 x 2 decode) and 512 rows (prefill, scoring,
the log-prob passes), the forward product and the two backward ones (dL/dx = g W, dL/dW = g^T x),
each path timed in turn after a warm-up of both, median of --repeats; then which path the auto
choice's timing (cpu.faster) picks for the same products now. As the choice does, each call multiplies the
next of cpu.cold_copies(weight), so that its weight comes from memory as in a model, and the decode
rows' forward products use weights reordered once (cpu.reusing_weights, as the sampler runs them).

    python bench/matmul.py [--threads 2] [--repeats 7] [--json]
"""

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import time

import torch

from minidpo import cpu

LAYERS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "vocab": (49152, 576)}
ROWS = {"decode b1": 1, "decode 32": 32, "scoring 512": 512}


def products(rows, out_features, in_features):
    """{forward, grad_x, grad_w}: (a, b) with the product a @ b^T, laid out as cpu._Linear passes them."""
    x, weight, grad = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(rows, out_features)
    return {"forward": (x, weight), "grad_x": (grad, weight.t()), "grad_w": (grad.t(), x.t())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["MINIDPO_CPU_MATMUL"] = "auto"
    print(f"{cpu.cpu_model()} | threads {args.threads} | torch {torch.__version__} | python {platform.python_version()}"
          f" | {time.strftime('%Y-%m-%d')} | medians of {args.repeats}, ms")
    print(f"{'rows':12}{'layer':9}{'product':9}{'onednn':>9}{'mkl':>9}{'mkl/onednn':>12}{'auto picks':>12}")
    table = []
    for row_name, rows in ROWS.items():
        for layer, shape in LAYERS.items():
            for product, (a, b) in products(rows, *shape).items():
                reused = row_name.startswith("decode") and product == "forward"
                times = {path: [] for path in cpu.PATHS}
                operands = {path: itertools.cycle(cpu.cold_copies(b, reused and path == "onednn")) for path in cpu.PATHS}
                for repeat in range(args.repeats + 1):  # repeat 0 warms both up
                    for path, fn in cpu.PATHS.items():
                        operand = next(operands[path])
                        start = time.perf_counter()
                        fn(a, operand)
                        if repeat:
                            times[path].append(1e3 * (time.perf_counter() - start))
                del operands
                with cpu.reusing_weights() if reused else contextlib.nullcontext():
                    weight = torch.nn.Parameter(b, requires_grad=False) if reused else b
                    picked = cpu.faster(a, weight, None)  # timed now, not kept from an earlier run
                ms = {path: statistics.median(t) for path, t in times.items()}
                table.append(dict(rows=rows, layer=layer, product=product, picked=picked, **{f"{k}_ms": v for k, v in ms.items()}))
                print(f"{row_name:12}{layer:9}{product:9}{ms['onednn']:9.3f}{ms['mkl']:9.3f}"
                      f"{ms['mkl'] / ms['onednn']:11.2f}x{picked:>12}")
    total = {path: sum(r[f"{path}_ms"] for r in table) for path in cpu.PATHS}
    best = sum(min(r["onednn_ms"], r["mkl_ms"]) for r in table)
    auto = sum(r[f"{r['picked']}_ms"] for r in table)
    print(f"sum over the table: onednn {total['onednn']:.1f} ms, mkl {total['mkl']:.1f} ms, "
          f"faster of the two each time {best:.1f} ms, auto's picks {auto:.1f} ms")
    if args.json:
        print(json.dumps({"cpu": cpu.cpu_model(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                          "rows": table, "sum_ms": {**total, "best": best, "auto": auto}}))


if __name__ == "__main__":
    main()
