"""Sampling speed: minidpo's Sampler against transformers' generate, same model, same prompts.

The workload is one online DPO sampling step: 16 chat prompts x 2 samples, exactly 64 new tokens
each (EOS suppressed until then), temperature 0.9, no top-k / top-p. A batch-1 greedy decode is
timed too, as milliseconds per decoded token. The two sides run in turn, after a warm-up of each,
and the table reports medians and how close each side gets to the machine's floor: every forward
pass must do its matmul FLOPs at the measured matmul throughput and read every weight once at the
measured copy bandwidth, whichever takes longer. (On CPU the 32-row steps are bound by FLOPs; on
CUDA, and at batch 1, by the weights' bytes. Attention and the KV cache are left out: a few percent
at these lengths.)

    python bench/generate.py                                  # CPU, fp32, offline SmolLM2
    python bench/generate.py --device cuda --dtype bfloat16
    python bench/generate.py --device cuda --shape qwen2-0.5b  # random weights, Qwen2-0.5B shape
"""

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers

import minidpo
from minidpo.checkpoint import resolve
from minidpo import cpu
from minidpo.sampler import Sampler

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea properly?",
    "What are the main differences between a list and a tuple in Python?",
    "Suggest a name for a friendly robot dog.",
    "Describe the water cycle step by step.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a prime number is, with examples.",
    "Write a short thank-you note to a teacher.",
    "What causes the seasons on Earth?",
    "List some healthy breakfast ideas.",
    "How does a bicycle stay upright when it moves?",
]
SAMPLES, NEW_TOKENS, TEMPERATURE = 2, 64, 0.9
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, eos_token_id=151643)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="offline:SmolLM2-135M-Instruct", help="a model directory or name for minidpo.load_pretrained")
    p.add_argument("--shape", choices=["qwen2-0.5b"], help="instead of --model: random weights of this shape, bf16 (CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile minidpo's decode step")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    return p.parse_args()


def load(args, workdir):
    """(minidpo model, transformers model, prompt ids [B, P], prompt mask, eos ids, pad id)."""
    dtype = getattr(torch, args.dtype)
    if args.shape:
        with torch.device(args.device):
            hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_05B)).to(dtype).eval()
        hf.save_pretrained(workdir)
        model = minidpo.load_model(workdir, dtype=dtype, device=args.device)
        # Random weights have no tokenizer: random prompts with the lengths of chat prompts.
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(30, 60, (len(PROMPTS),), generator=g)
        ids = torch.zeros(len(PROMPTS), int(lengths.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths.tolist()):
            ids[row, -n:] = torch.randint(1, 50000, (n,), generator=g)
            mask[row, -n:] = 1
        eos = QWEN2_05B["eos_token_id"]
        return model, hf, ids, mask, [eos], eos
    model, tok = minidpo.load_pretrained(args.model, dtype=dtype, device=args.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=dtype).to(args.device).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    ids, mask = tok(texts, add_special_tokens=False)  # the template writes the special tokens itself
    return model, hf, ids, mask, tok.eos_token_ids, tok.pad_token_id


def timed(fn, device):
    """(seconds, result) of fn(), waiting for the device on both sides."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def matmul_flops_per_s(dtype, device):
    """Best throughput of a large square matmul, through torch.mm or (CPU) oneDNN's linear, whichever
    is faster: what the machine's matmul units can do."""
    n = 4096 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    onednn = cpu.PATHS["onednn"] if device == "cpu" and cpu._onednn_linear is not None else torch.mm
    best = min(timed(product, device)[0] for product in (lambda: a @ b, lambda: onednn(a, b)) for _ in range(10))
    return 2 * n**3 / best


def copy_bytes_per_s(device):
    """Memory bandwidth from a 1 GiB copy, bytes read + written. (Written first: on CPU, pages never
    touched all map to one zero page, and reading them measures the cache, not memory.)"""
    src = torch.ones(2**28, device=device)
    dst = torch.zeros_like(src)
    best = min(timed(lambda: dst.copy_(src), device)[0] for _ in range(10))
    return 2 * 4 * src.numel() / best


def matmul_choice():
    """What minidpo's fp32 CPU linears ran on: MINIDPO_CPU_MATMUL, and with auto how many shape
    classes chose each path (minidpo/cpu.py)."""
    setting = os.environ.get("MINIDPO_CPU_MATMUL", "auto")
    counts = collections.Counter(cpu.choices().values())
    return setting if setting != "auto" else "auto (" + ", ".join(f"{p} {counts[p]}" for p in cpu.PATHS) + " shape classes)"


def main():
    args = parse_args()
    if args.shape:
        if not args.device.startswith("cuda"):
            sys.exit("--shape qwen2-0.5b needs --device cuda")
        args.dtype = "bfloat16"
    torch.set_num_threads(args.threads)
    # This run times its own matmul choices, not those an earlier run on the machine kept (cpu.choices_file).
    os.environ["MINIDPO_CPU_CHOICES"] = os.path.join(tempfile.mkdtemp(prefix="minidpo-bench-"), "cpu_matmul.json")
    with tempfile.TemporaryDirectory(prefix="minidpo-bench-") as workdir:
        model, hf, ids, mask, eos, pad = load(args, workdir)
    ids, mask = ids.to(args.device), mask.to(args.device)
    cfg = model.cfg
    sampler = Sampler(model, cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
    generator = torch.Generator(args.device).manual_seed(0)

    def ours(ids, mask, n, new_tokens, temperature):
        out = sampler.generate(ids, mask, n=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               temperature=temperature, top_k=0, top_p=1.0, eos_token_ids=eos, pad_token_id=pad,
                               generator=generator)
        return out.ids

    def theirs(ids, mask, n, new_tokens, temperature):
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
        out = hf.generate(input_ids=ids, attention_mask=mask, num_return_sequences=n, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
        return out[:, ids.shape[1]:]

    sides = {"minidpo": ours, "transformers": theirs}
    batch = (ids, mask, SAMPLES, NEW_TOKENS, TEMPERATURE)
    one = (ids[:1, -int(mask[0].sum()):], mask[:1, -int(mask[0].sum()):], 1)  # the first prompt, unpadded
    seconds = {name: {"batch": [], "b1": [], "b1_prefill": []} for name in sides}
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up (and CUDA graph capture)
        for name, fn in sides.items():
            t, out = timed(lambda: fn(*batch), args.device)
            assert out.shape == (len(PROMPTS) * SAMPLES, NEW_TOKENS), out.shape
            # Batch-1 greedy decode: time 1 + 64 tokens and 1 token; the difference is 64 decode steps.
            t_b1 = timed(lambda: fn(*one, NEW_TOKENS + 1, 0), args.device)[0]
            t_pre = timed(lambda: fn(*one, 1, 0), args.device)[0]
            if repeat:
                seconds[name]["batch"].append(t)
                seconds[name]["b1"].append(t_b1)
                seconds[name]["b1_prefill"].append(t_pre)

    rows = len(PROMPTS) * SAMPLES
    tokens = rows * NEW_TOKENS
    result = {}
    for name in sides:
        batch_s = statistics.median(seconds[name]["batch"])
        decode_s = statistics.median(b - p for b, p in zip(seconds[name]["b1"], seconds[name]["b1_prefill"]))
        result[name] = dict(tokens_per_s=tokens / batch_s, batch_s=batch_s, b1_ms_per_token=1e3 * decode_s / NEW_TOKENS)

    # The floor. Matmul weights: every linear layer, plus the vocabulary projection.
    head = cfg.vocab_size * cfg.hidden_size
    linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    weight_bytes = (linear + head) * model.embed.weight.element_size()
    peak, bandwidth = matmul_flops_per_s(model.embed.weight.dtype, args.device), copy_bytes_per_s(args.device)

    def forward_floor(tokens, head_rows):
        return max(2 * (tokens * linear + head_rows * head) / peak, weight_bytes / bandwidth)

    # The prefill runs the real prompt tokens, and the vocabulary projection on their last ones;
    # each of the 63 decode steps runs every row.
    batch_floor = forward_floor(int(mask.sum()), len(PROMPTS)) + (NEW_TOKENS - 1) * forward_floor(rows, rows)
    step_floor = forward_floor(1, 1)
    floor_note = (f"matmul {peak / 1e9:.0f} GFLOP/s, copy {bandwidth / 1e9:.0f} GB/s, "
                  f"weights {weight_bytes / 2**20:.0f} MiB")
    for r in result.values():
        r["floor_fraction"] = batch_floor / r["batch_s"]
        r["b1_floor_fraction"] = step_floor * 1e3 / r["b1_ms_per_token"]

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu.cpu_model()
    graphs = "n/a" if not args.device.startswith("cuda") else "off" if args.no_cuda_graphs else "on"
    print(f"model {args.shape or args.model} | {args.device} ({device_name}) | {args.dtype} | threads {args.threads}"
          f" | cuda graphs {graphs} | compile {'on' if args.compile else 'off'}")
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()}"
          f" | {time.strftime('%Y-%m-%d')}" + (f" | fp32 matmul {matmul_choice()}" if args.device == "cpu" else ""))
    print(f"{len(PROMPTS)} prompts x {SAMPLES} samples x {NEW_TOKENS} tokens, temperature {TEMPERATURE}, top_k 0,"
          f" top_p 1.0; medians of {args.repeats}; floor: {floor_note}")
    print(f"{'':14}{'tokens/s':>10}{'s/run':>8}{'of floor':>10}{'b1 ms/tok':>11}{'b1 of floor':>13}")
    for name, r in result.items():
        print(f"{name:14}{r['tokens_per_s']:10.0f}{r['batch_s']:8.2f}{r['floor_fraction']:10.0%}"
              f"{r['b1_ms_per_token']:11.2f}{r['b1_floor_fraction']:13.0%}")
    ratio = result["minidpo"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    b1_ratio = result["transformers"]["b1_ms_per_token"] / result["minidpo"]["b1_ms_per_token"]
    print(f"minidpo / transformers: {ratio:.2f}x tokens/s, {b1_ratio:.2f}x batch-1 decode")
    if args.json:
        print(json.dumps({
            "minidpo_tokens_per_s": result["minidpo"]["tokens_per_s"],
            "transformers_tokens_per_s": result["transformers"]["tokens_per_s"],
            "ratio": ratio,
            "minidpo_floor_fraction": result["minidpo"]["floor_fraction"],
            "transformers_floor_fraction": result["transformers"]["floor_fraction"],
            "minidpo_b1_ms_per_token": result["minidpo"]["b1_ms_per_token"],
            "transformers_b1_ms_per_token": result["transformers"]["b1_ms_per_token"],
            "minidpo_b1_floor_fraction": result["minidpo"]["b1_floor_fraction"],
            "b1_ratio": b1_ratio,
            "model": args.shape or args.model, "device": args.device, "device_name": device_name,
            "dtype": args.dtype, "threads": args.threads, "cuda_graphs": graphs, "compile": args.compile,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "cpu_matmul": matmul_choice(),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }))


if __name__ == "__main__":
    main()
