"""Online DPO step: minidpo's Trainer.train_step against TRL's OnlineDPOTrainer, same job.

The job: the policy SmolLM2-135M-Instruct (offline import, fp32, a frozen fp32 copy as the
reference), the first --batch prompts of minidpo/prompts.jsonl (conversational) as the whole
dataset, so every step of both sides sees the same prompts; 2 completions per prompt of at most
--new-tokens tokens (neither trainer has a min_new_tokens: both stop at EOS, or when every row has
finished), temperature 0.9, top-k 0, top-p 1.0; max_length the same on both sides; the reward
`brevity` below (minidpo.judges:brevity on the completion's text) plus missing_eos_penalty 1.0;
sigmoid loss, beta 0.1, AdamW lr 1e-6, linear schedule, grad-norm clip 1.0, no gradient
checkpointing, no bf16, no accumulation.

Each side runs in its own subprocess (one after the other, never at once), so that its peak
memory (VmHWM, the process's resident high-water mark: both models, AdamW state, activations,
the libraries it imports) is its own. Each subprocess takes one warm-up step, then --steps timed
steps; --rounds alternates the two sides that many times, and the table gives medians over all
timed steps. minidpo's step is split by wrapping its sampler and its preference (scoring) step;
the policy's and the reference's forward passes (log-probs) and the AdamW step likewise; the rest is
decoding the completions, log-softmax, loss, backward and clipping.

    pip install trl==1.16.0          # the anchor (keeps the installed torch)
    python bench/train_step.py --json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "offline:SmolLM2-135M-Instruct"
PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minidpo", "prompts.jsonl")
TEMPERATURE, BETA, LR, SEED, EOS_PENALTY = 0.9, 0.1, 1e-6, 42, 1.0


def brevity(prompts, completions, **kwargs):
    """minidpo.judges:brevity for both trainers. TRL hands a conversational prompt's completions over
    as [{"role": "assistant", "content": text}]; minidpo as the text. Score the text either way."""
    from minidpo.judges import brevity as rule
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return rule(prompts, texts, **kwargs)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="prompts per step (2 completions each)")
    p.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens")
    p.add_argument("--max-length", type=int, default=256, help="max_length (prompt + completion)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="times each side runs, alternating")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    p.add_argument("--side", choices=["minidpo", "trl"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    return p.parse_args()


def peak_rss_mb():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


# ---- the children: one side each, printing one JSON line ----

def run_minidpo(args, workdir):
    import torch
    from minidpo.config import parse_args as minidpo_args
    from minidpo.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = minidpo_args([
        "--model_name_or_path", MODEL, "--dataset_name", args.prompts_file, "--output_dir", workdir,
        "--reward_funcs", f"{os.path.abspath(__file__)}:brevity", "--missing_eos_penalty", str(EOS_PENALTY),
        "--per_device_train_batch_size", str(args.batch), "--max_new_tokens", str(args.new_tokens),
        "--max_length", str(args.max_length), "--temperature", str(TEMPERATURE), "--beta", str(BETA),
        "--learning_rate", str(LR), "--lr_scheduler_type", "linear", "--max_grad_norm", "1.0",
        "--max_steps", str(args.steps + 1), "--seed", str(SEED), "--bf16", "false",
        "--gradient_checkpointing", "false", "--save_steps", "0"])
    trainer = Trainer(cfg)

    names = ("generate", "score", "policy_forward", "reference_forward", "optimizer")
    parts = dict.fromkeys(names, 0.0)
    tokens = []

    sampling = [False]  # the sampler's own forward passes count as generation, not as policy_forward

    def timed(name, fn):
        def wrapper(*a, **kw):
            if sampling[0]:
                return fn(*a, **kw)
            sampling[0] = name == "generate"
            start = time.perf_counter()
            try:
                out = fn(*a, **kw)
            finally:
                sampling[0] = False
            parts[name] += time.perf_counter() - start
            if name == "generate":
                tokens.append(out.mask.sum().item() / out.mask.shape[0])
            return out
        return wrapper

    trainer.sampler.generate = timed("generate", trainer.sampler.generate)
    trainer.preference = timed("score", trainer.preference)
    trainer.policy.forward = timed("policy_forward", trainer.policy.forward)
    trainer.reference.forward = timed("reference_forward", trainer.reference.forward)
    trainer.optimizer.step = timed("optimizer", trainer.optimizer.step)
    batches = trainer.micro_batches()
    steps, breakdown = [], []
    for i in range(args.steps + 1):
        parts.update(dict.fromkeys(names, 0.0))
        start = time.perf_counter()
        trainer.train_step(batches)
        trainer.step += 1
        seconds = time.perf_counter() - start
        if i:  # step 0 is the warm-up
            steps.append(seconds)
            breakdown.append({**parts, "rest": seconds - sum(parts.values())})
    return {"steps": steps, "breakdown": breakdown, "tokens": tokens[1:], "peak_mb": peak_rss_mb(),
            "versions": {"torch": torch.__version__}}


def run_trl(args, workdir):
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from minidpo.checkpoint import resolve

    torch.set_num_threads(args.threads)
    path = str(resolve(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with open(args.prompts_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config = OnlineDPOConfig(
        output_dir=workdir, per_device_train_batch_size=args.batch, max_new_tokens=args.new_tokens,
        max_length=args.max_length, temperature=TEMPERATURE, top_k=0, top_p=1.0, beta=BETA,
        missing_eos_penalty=EOS_PENALTY, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0,
        max_steps=args.steps + 1, seed=SEED, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], None

        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.steps.append(time.perf_counter() - self.start)

    times = StepTimes()
    trainer = OnlineDPOTrainer(model=model, reward_funcs=brevity, args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(rows), callbacks=[times])
    tokens = []
    generate = trainer._generate

    def counted(*a, **kw):
        out = generate(*a, **kw)
        tokens.append(out[3].sum().item() / out[3].shape[0])  # completion_mask
        return out

    trainer._generate = counted
    trainer.train()
    assert len(times.steps) == args.steps + 1, times.steps
    return {"steps": times.steps[1:], "tokens": tokens[1:], "peak_mb": peak_rss_mb(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__}}


def child(args):
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as workdir:
        result = (run_minidpo if args.side == "minidpo" else run_trl)(args, workdir)
    print(json.dumps(result))


# ---- the parent: runs the children in turn, prints the table ----

def main():
    args = parse_args()
    if args.side:
        return child(args)
    from generate import cpu_name  # bench/generate.py, beside this script; only the parent needs it
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        prompts_file = os.path.join(tmp, "prompts.jsonl")
        with open(PROMPTS) as f, open(prompts_file, "w") as out:
            out.writelines([line for line in f if line.strip()][: args.batch])
        runs = {"minidpo": [], "trl": []}
        for _ in range(args.rounds):
            for side in runs:
                cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--prompts-file", prompts_file,
                       "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--max-length",
                       str(args.max_length), "--steps", str(args.steps), "--threads", str(args.threads)]
                env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{side}: steps {', '.join(f'{s:.2f}' for s in runs[side][-1]['steps'])} s, "
                      f"peak {runs[side][-1]['peak_mb']:.0f} MB", file=sys.stderr)

    res = {}
    for side, rs in runs.items():
        steps = [s for r in rs for s in r["steps"]]
        res[side] = {"s_per_step": statistics.median(steps), "min": min(steps), "max": max(steps),
                     "peak_mb": max(r["peak_mb"] for r in rs),
                     "tokens": statistics.mean(t for r in rs for t in r["tokens"])}
    parts = [b for r in runs["minidpo"] for b in r["breakdown"]]
    breakdown = {k: statistics.median(b[k] for b in parts) for k in parts[0]}
    versions = {**runs["trl"][0]["versions"], "python": platform.python_version()}
    ratio = res["minidpo"]["s_per_step"] / res["trl"]["s_per_step"]
    mem_ratio = res["minidpo"]["peak_mb"] / res["trl"]["peak_mb"]
    n = len(parts)

    print(f"model {MODEL} fp32 | cpu ({cpu_name()}) | threads {args.threads} | "
          + " | ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{args.batch} prompts x 2 completions x <= {args.new_tokens} new tokens, max_length {args.max_length}, "
          f"temperature {TEMPERATURE}; medians of {n} steps ({args.rounds} rounds x {args.steps}, 1 warm-up each)")
    print(f"{'':10}{'s/step':>8}{'min':>7}{'max':>7}{'peak MB':>9}{'tokens/completion':>19}")
    for side, r in res.items():
        print(f"{side:10}{r['s_per_step']:8.2f}{r['min']:7.2f}{r['max']:7.2f}{r['peak_mb']:9.0f}{r['tokens']:19.1f}")
    print(f"minidpo / TRL: {ratio:.2f}x time per step, {mem_ratio:.2f}x peak memory")
    print("minidpo step: " + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items()))
    if args.json:
        print(json.dumps({
            "minidpo_s_per_step": res["minidpo"]["s_per_step"], "trl_s_per_step": res["trl"]["s_per_step"],
            "ratio": ratio, "minidpo_peak_mb": res["minidpo"]["peak_mb"], "trl_peak_mb": res["trl"]["peak_mb"],
            "peak_ratio": mem_ratio, "minidpo_breakdown_s": breakdown,
            "minidpo_tokens_per_completion": res["minidpo"]["tokens"], "trl_tokens_per_completion": res["trl"]["tokens"],
            "batch": args.batch, "max_new_tokens": args.new_tokens, "max_length": args.max_length,
            "temperature": TEMPERATURE, "threads": args.threads, "steps": n, "model": MODEL,
            "device_name": cpu_name(), **versions,
        }))


if __name__ == "__main__":
    main()
