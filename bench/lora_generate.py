"""Generation with LoRA adapters: adding the low-rank products at every step against merging them
into the weights for the rollout and restoring the weights after (lora.adapters_merged, kept).

SmolLM2-135M-Instruct (offline import, fp32), adapters of rank --rank with random B on PEFT's
default targets (q_proj, v_proj) or on all linear layers; the trainer's rollout shape: --batch
prompts x 2 completions x --new-tokens tokens (min_new_tokens = max, so every run decodes the same
number of steps). "merge" counts its work per rollout: keep a copy of the adapted rows of each
weight, add scale * B A, generate, copy the rows back (W + BA - BA is not W in floating point). The two
variants alternate --rounds times; medians are printed.

    python bench/lora_generate.py --targets default
    python bench/lora_generate.py --targets all-linear
"""

import argparse
import statistics
import time

import torch

from minidpo import cpu, load_pretrained
from minidpo.lora import LoraSpec, adapters_merged, add_adapters
from minidpo.sampler import Sampler


def merged_rollout(model, sampler, **kw):
    with adapters_merged(model):
        return sampler.generate(**kw)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", choices=["default", "all-linear"], default="default")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("offline:SmolLM2-135M-Instruct")
    add_adapters(model, LoraSpec(r=args.rank, target_modules=None if args.targets == "default" else "all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(args.batch)]
    ids, mask = tokenizer.encode_rows(prompts)
    sampler = Sampler(model.eval())
    kw = dict(input_ids=ids, attention_mask=mask, n=2, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, temperature=0.9, eos_token_ids=tokenizer.eos_token_ids,
              pad_token_id=tokenizer.pad_token_id)
    variants = {"per step": lambda: sampler.generate(**kw), "merge": lambda: merged_rollout(model, sampler, **kw)}
    times = {name: [] for name in variants}
    for i in range(args.rounds + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if i:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    print(f"SmolLM2-135M fp32 | cpu ({cpu.cpu_model()}) | threads {args.threads} | LoRA r={args.rank} on {args.targets} "
          f"targets | {args.batch} prompts x 2 x {args.new_tokens} tokens | medians of {args.rounds}")
    for name, ts in times.items():
        print(f"{name:10} {statistics.median(ts):6.3f} s per rollout (min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
