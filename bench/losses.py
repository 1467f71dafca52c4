"""What a loss costs: minidpo's online step with --loss_type sigmoid (the anchor) against the others.

The job of bench/train_step.py on the minidpo side: the offline SmolLM2-135M-Instruct (fp32), the
first --batch prompts of minidpo/prompts.jsonl, 2 completions per prompt of at most --new-tokens
tokens, the brevity rule with missing_eos_penalty 1.0. SimPO loads and runs no reference model, so
it should save the reference's forward pass and its weights. Each loss runs in its own subprocess
(one after the other), one warm-up step then --steps timed steps, alternating --rounds times;
medians, and the peak resident memory (VmHWM) of each process.

    python bench/losses.py --json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from train_step import PROMPTS, peaks  # bench/train_step.py, beside this script


def child(args):
    import torch

    from minidpo.config import parse_args as minidpo_args
    from minidpo.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        prompts = os.path.join(out, "prompts.jsonl")
        with open(PROMPTS) as f, open(prompts, "w") as w:
            w.writelines([line for line in f if line.strip()][: args.batch])
        trainer = Trainer(minidpo_args([
            "--model_name_or_path", "offline:SmolLM2-135M-Instruct", "--dataset_name", prompts, "--output_dir", out,
            "--reward_funcs", "minidpo.judges:brevity", "--missing_eos_penalty", "1.0", "--loss_type", args.side,
            "--per_device_train_batch_size", str(args.batch), "--max_new_tokens", str(args.new_tokens),
            "--learning_rate", "1e-6", "--save_steps", "0", "--max_steps", str(args.steps + 1)]))
        batches, steps = trainer.micro_batches(), []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            trainer.train_step([next(batches)])
            trainer.step += 1
            if i:  # step 0 is the warm-up
                steps.append(time.perf_counter() - start)
    print(json.dumps({"steps": steps, **peaks()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", nargs="+", default=["sigmoid", "simpo"], help="the first is the anchor")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--side", help=argparse.SUPPRESS)  # a child process: the loss to run
    args = p.parse_args()
    if args.side:
        return child(args)
    runs = {loss: [] for loss in args.losses}
    for _ in range(args.rounds):
        for loss in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--side", loss, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode:
                sys.exit(f"{loss} failed:\n{proc.stderr[-4000:]}")
            runs[loss].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    anchor = args.losses[0]
    res = {loss: {"s_per_step": statistics.median(s for r in rs for s in r["steps"]),
                  "peak_mb": max(r["peak_mb"] for r in rs)} for loss, rs in runs.items()}
    print(f"{'':10}{'s/step':>8}{'peak MB':>9}{'time':>8}{'memory':>8}   (ratios to {anchor})")
    for loss, r in res.items():
        print(f"{loss:10}{r['s_per_step']:8.2f}{r['peak_mb']:9.0f}{r['s_per_step'] / res[anchor]['s_per_step']:8.2f}"
              f"{r['peak_mb'] / res[anchor]['peak_mb']:8.2f}")
    if args.json:
        print(json.dumps({"results": res, "anchor": anchor, "batch": args.batch, "max_new_tokens": args.new_tokens,
                          "steps": args.steps * args.rounds, "threads": args.threads}))


if __name__ == "__main__":
    main()
