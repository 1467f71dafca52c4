"""Online DPO step: minidpo's Trainer.train_step against TRL's OnlineDPOTrainer, same job.

The job: the policy SmolLM2-135M-Instruct (offline import, fp32, a frozen fp32 copy as the
reference), the first --batch prompts of minidpo/prompts.jsonl (conversational) as the whole
dataset, so every step of both sides sees the same prompts; 2 completions per prompt of at most
--new-tokens tokens (neither trainer has a min_new_tokens: both stop at EOS, or when every row has
finished), temperature 0.9, top-k 0, top-p 1.0; max_length the same on both sides; the reward:
with --reward model (the default) a reward model, the same SmolLM2 with a one-output score head
(seeded random init) saved as an HF LlamaForSequenceClassification, each side scoring the chat
rendered with its tokenizer; with --reward brevity, `brevity` below (minidpo.judges:brevity on
the completion's text); plus missing_eos_penalty 1.0 either way; sigmoid loss, beta 0.1, AdamW
lr 1e-6, linear schedule, grad-norm clip 1.0, no gradient checkpointing, no bf16, no accumulation.

Each side runs in its own subprocess (one after the other, never at once), so that its peak
memory (VmHWM, the process's resident high-water mark: both models, AdamW state, activations,
the libraries it imports) is its own. Each subprocess takes one warm-up step, then --steps timed
steps; --rounds alternates the two sides that many times, and the table gives medians over all
timed steps. Each side's step is split by wrapping its own functions: generation (its forward
passes included), scoring (reward), the policy's and the reference's log-prob passes, backward
(torch.Tensor.backward), the gradient-norm clipping (torch.nn.utils.clip_grad_norm_, which both
call) and the AdamW step; the rest is decoding and tokenising, the loss and the metrics.

--peft trains LoRA adapters on both sides (r 16, alpha 32, dropout 0.05, PEFT's default targets
q_proj and v_proj; TRL through peft.LoraConfig, minidpo through --use_peft), each taking its
reference pass with the adapters off, and adds a third side, "full": minidpo's full fine-tuning of
the same job, for LoRA's share of its time and peak memory.

--trl-keep-freed-memory gives TRL's process the glibc setting minidpo's trainer makes on CPU
(minidpo.cpu.keep_freed_memory): the difference it makes to TRL is the setting's share of the gap.

Both sides use the GPU when there is one. --shape replaces SmolLM2 by random weights of another
shape with SmolLM2's tokenizer (--tokenizer: a directory holding its files, where the offline
model cannot be imported), --bf16 runs both under bf16 autocast over fp32 weights; peak GPU
memory (torch.cuda.max_memory_allocated) is then the memory compared.

    pip install trl==1.16.0          # the anchor (keeps the installed torch)
    python bench/train_step.py --json
    python bench/train_step.py --shape qwen2-0.5b --bf16 --tokenizer DIR --json   # on a GPU
    python bench/train_step.py --peft --json    # LoRA on both sides, and minidpo's full fine-tuning
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "offline:SmolLM2-135M-Instruct"
# --shape: random weights of these shapes, with SmolLM2's tokenizer and 49152-token vocabulary.
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
    "qwen2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),  # to try the script in seconds
}
PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minidpo", "prompts.jsonl")
TEMPERATURE, BETA, LR, SEED, EOS_PENALTY = 0.9, 0.1, 1e-6, 42, 1.0
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05


def brevity(prompts, completions, **kwargs):
    """minidpo.judges:brevity for both trainers. TRL hands a conversational prompt's completions over
    as [{"role": "assistant", "content": text}]; minidpo as the text. Score the text either way."""
    from minidpo.judges import brevity as rule
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return rule(prompts, texts, **kwargs)


def make_models(args, tmp):
    """(policy directory, reward model directory or None) in the HF layout, written under tmp."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minidpo.checkpoint import resolve

    transformers.logging.set_verbosity_error()  # its report on the new, untrained score head
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(resolve(MODEL)))
    if not args.shape:
        policy = str(resolve(MODEL))
    else:
        policy = os.path.join(tmp, args.shape)
        config = transformers.Qwen2Config(**SHAPES[args.shape], vocab_size=len(tokenizer), tie_word_embeddings=True,
                                          max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        transformers.Qwen2ForCausalLM(config).save_pretrained(policy)
        tokenizer.save_pretrained(policy)
    if args.reward != "model":
        return policy, None
    reward = os.path.join(tmp, "reward-model")
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    return policy, reward


def now():
    """time.perf_counter() once the GPU, if any, has finished what it was given."""
    import torch
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def timing(parts, name, fn, busy):
    """fn, adding its seconds to parts[name]; calls made while another timed function runs (busy[0])
    count for that one (a generation's own forward passes are generation, not policy forward)."""
    def wrapper(*a, **kw):
        if busy[0]:
            return fn(*a, **kw)
        busy[0] = True
        start = now()
        try:
            return fn(*a, **kw)
        finally:
            busy[0] = False
            parts[name] += now() - start
    return wrapper


def peaks():
    """Peak memory in MB: the process's resident high-water mark, and the GPU's when one was used."""
    import torch
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    return {"peak_mb": kb / 1024, "gpu_peak_mb": gpu}


PARTS = ("generate", "score", "policy_forward", "reference_forward", "backward", "clip", "optimizer")


def time_backward_and_clipping(parts, busy):
    """Both sides call these two through the torch module's attributes: wrap them there."""
    import torch
    torch.Tensor.backward = timing(parts, "backward", torch.Tensor.backward, busy)
    torch.nn.utils.clip_grad_norm_ = timing(parts, "clip", torch.nn.utils.clip_grad_norm_, busy)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="prompts per step (2 completions each)")
    p.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens")
    p.add_argument("--max-length", type=int, default=256, help="max_length (prompt + completion)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="times each side runs, alternating")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--reward", choices=["model", "brevity"], default="model",
                   help="a reward model (the policy's checkpoint with a score head) or the brevity rule")
    p.add_argument("--shape", choices=list(SHAPES), help="random weights of this shape instead of SmolLM2")
    p.add_argument("--tokenizer", help="a directory with SmolLM2's tokenizer files (default: the offline model's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights, both sides (--bf16 / bf16=True)")
    p.add_argument("--peft", action="store_true",
                   help="LoRA on both sides, plus minidpo's full fine-tuning as a third side")
    p.add_argument("--trl-keep-freed-memory", action="store_true",
                   help="apply minidpo's glibc setting (cpu.keep_freed_memory) to TRL's process too")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    p.add_argument("--side", choices=["minidpo", "trl", "full"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--reward-model", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- the children: one side each, printing one JSON line ----

def run_minidpo(args, workdir):
    import torch
    from minidpo import cpu
    from minidpo.config import parse_args as minidpo_args
    from minidpo.trainer import Trainer

    torch.set_num_threads(args.threads)
    reward = (["--reward_model_path", args.reward_model] if args.reward_model
              else ["--reward_funcs", f"{os.path.abspath(__file__)}:brevity"])
    lora = ["--use_peft", "--lora_r", str(LORA_R), "--lora_alpha", str(LORA_ALPHA),
            "--lora_dropout", str(LORA_DROPOUT)] if args.peft and args.side != "full" else []
    cfg = minidpo_args([
        "--model_name_or_path", args.model_dir, "--dataset_name", args.prompts_file, "--output_dir", workdir,
        *reward, "--missing_eos_penalty", str(EOS_PENALTY),
        "--per_device_train_batch_size", str(args.batch), "--max_new_tokens", str(args.new_tokens),
        "--max_length", str(args.max_length), "--temperature", str(TEMPERATURE), "--beta", str(BETA),
        "--learning_rate", str(LR), "--lr_scheduler_type", "linear", "--max_grad_norm", "1.0",
        "--max_steps", str(args.steps + 1), "--seed", str(SEED), "--bf16", str(args.bf16).lower(),
        "--gradient_checkpointing", "false", "--save_steps", "0", *lora])
    trainer = Trainer(cfg)

    parts, busy, tokens = dict.fromkeys(PARTS, 0.0), [False], []
    generate = trainer.sampler.generate

    def counted(*a, **kw):
        out = generate(*a, **kw)
        tokens.append(out.mask.sum().item() / out.mask.shape[0])
        return out

    trainer.sampler.generate = timing(parts, "generate", counted, busy)
    trainer.preference = timing(parts, "score", trainer.preference, busy)
    trainer.policy.forward = timing(parts, "policy_forward", trainer.policy.forward, busy)
    if trainer.reference is None:  # LoRA: the policy with its adapters off
        trainer.reference_logps = timing(parts, "reference_forward", trainer.reference_logps, busy)
    else:
        trainer.reference.forward = timing(parts, "reference_forward", trainer.reference.forward, busy)
    trainer.optimizer.step = timing(parts, "optimizer", trainer.optimizer.step, busy)
    time_backward_and_clipping(parts, busy)
    batches = trainer.micro_batches()
    steps, breakdown = [], []
    for i in range(args.steps + 1):
        parts.update(dict.fromkeys(PARTS, 0.0))
        start = now()
        trainer.train_step([next(batches)])
        trainer.step += 1
        seconds = now() - start
        if i:  # step 0 is the warm-up
            steps.append(seconds)
            breakdown.append({**parts, "rest": seconds - sum(parts.values())})
    choices = list(cpu.choices().values())
    matmul = os.environ.get("MINIDPO_CPU_MATMUL", "auto")
    if matmul == "auto":  # how many shape classes chose each path (minidpo/cpu.py)
        matmul += " (" + ", ".join(f"{p} {choices.count(p)}" for p in cpu.PATHS) + " shape classes)"
    return {"steps": steps, "breakdown": breakdown, "tokens": tokens[1:], **peaks(),
            "versions": {"torch": torch.__version__}, "cpu_matmul": matmul}


def run_trl(args, workdir):
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    if args.trl_keep_freed_memory:
        from minidpo.cpu import keep_freed_memory
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    with open(args.prompts_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config = OnlineDPOConfig(
        output_dir=workdir, per_device_train_batch_size=args.batch, max_new_tokens=args.new_tokens,
        max_length=args.max_length, temperature=TEMPERATURE, top_k=0, top_p=1.0, beta=BETA,
        missing_eos_penalty=EOS_PENALTY, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0,
        max_steps=args.steps + 1, seed=SEED, bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0)

    parts, busy, tokens = dict.fromkeys(PARTS, 0.0), [False], []

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.steps, self.breakdown, self.start = [], [], None

        def on_step_begin(self, *a, **kw):
            parts.update(dict.fromkeys(PARTS, 0.0))
            self.start = now()

        def on_step_end(self, *a, **kw):
            seconds = now() - self.start
            self.steps.append(seconds)
            self.breakdown.append({**parts, "rest": seconds - sum(parts.values())})

    times = StepTimes()
    if args.peft:
        from peft import LoraConfig
        lora_config = dict(peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                                  task_type="CAUSAL_LM"))
    else:
        lora_config = {}
    reward = dict(reward_funcs=args.reward_model, reward_processing_classes=AutoTokenizer.from_pretrained(
        args.reward_model)) if args.reward_model else dict(reward_funcs=brevity)
    trainer = OnlineDPOTrainer(model=model, args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(rows), callbacks=[times], **reward, **lora_config)
    generate, forward = trainer._generate, trainer._forward
    in_reference = [False]  # with peft, TRL's reference pass is the model under disable_adapter()
    if args.peft:
        disable_adapter = trainer.model.disable_adapter

        @contextlib.contextmanager
        def flagged():
            with disable_adapter():
                in_reference[0] = True
                try:
                    yield
                finally:
                    in_reference[0] = False

        trainer.model.disable_adapter = flagged

    def counted(*a, **kw):
        out = generate(*a, **kw)
        tokens.append(out[3].sum().item() / out[3].shape[0])  # completion_mask
        return out

    trainer._generate = timing(parts, "generate", counted, busy)
    trainer._calculate_rewards_from_functions = timing(parts, "score", trainer._calculate_rewards_from_functions, busy)
    timed_forward = {name: timing(parts, name, forward, busy) for name in ("policy_forward", "reference_forward")}
    trainer._forward = lambda model, *a, **kw: timed_forward[
        "reference_forward" if model is trainer.ref_model or in_reference[0] else "policy_forward"](model, *a, **kw)
    torch.optim.AdamW.step = timing(parts, "optimizer", torch.optim.AdamW.step, busy)  # created inside train()
    time_backward_and_clipping(parts, busy)
    trainer.train()
    assert len(times.steps) == args.steps + 1, times.steps
    return {"steps": times.steps[1:], "breakdown": times.breakdown[1:], "tokens": tokens[1:],
            **peaks(), "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                                   "trl": trl.__version__}}


def child(args):
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as workdir:
        result = (run_trl if args.side == "trl" else run_minidpo)(args, workdir)
    print(json.dumps(result))


# ---- the parent: runs the children in turn, prints the table ----

def main():
    args = parse_args()
    if args.side:
        return child(args)
    import torch
    from minidpo.cpu import cpu_model
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        prompts_file = os.path.join(tmp, "prompts.jsonl")
        with open(PROMPTS) as f, open(prompts_file, "w") as out:
            out.writelines([line for line in f if line.strip()][: args.batch])
        policy, reward_model = make_models(args, tmp)
        common = ["--prompts-file", prompts_file, "--model-dir", policy, "--batch", str(args.batch),
                  "--new-tokens", str(args.new_tokens), "--max-length", str(args.max_length),
                  "--steps", str(args.steps), "--threads", str(args.threads)]
        if reward_model:
            common += ["--reward-model", reward_model]
        common += ["--bf16"] * args.bf16 + ["--trl-keep-freed-memory"] * args.trl_keep_freed_memory
        common += ["--peft"] * args.peft
        runs = {"minidpo": [], "trl": [], **({"full": []} if args.peft else {})}
        for _ in range(args.rounds):
            for side in runs:
                cmd = [sys.executable, os.path.abspath(__file__), "--side", side, *common]
                # minidpo times its matmul choices in the first round and keeps them for the next
                # (cpu.choices_file), not those of an earlier run on the machine.
                env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
                           MINIDPO_CPU_CHOICES=os.path.join(tmp, "cpu_matmul.json"))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{side}: steps {', '.join(f'{s:.2f}' for s in runs[side][-1]['steps'])} s, "
                      f"peak {runs[side][-1]['peak_mb']:.0f} MB", file=sys.stderr)

    res = {}
    for side, rs in runs.items():
        steps = [s for r in rs for s in r["steps"]]
        parts = [b for r in rs for b in r["breakdown"]]
        res[side] = {"s_per_step": statistics.median(steps), "min": min(steps), "max": max(steps),
                     "peak_mb": max(r["peak_mb"] for r in rs),
                     "gpu_peak_mb": max(r["gpu_peak_mb"] for r in rs) if rs[0]["gpu_peak_mb"] else None,
                     "tokens": statistics.mean(t for r in rs for t in r["tokens"]),
                     "breakdown": {k: statistics.median(b[k] for b in parts) for k in parts[0]}}
    versions = {**runs["trl"][0]["versions"], "python": platform.python_version()}
    ratio = res["minidpo"]["s_per_step"] / res["trl"]["s_per_step"]
    memory = "gpu_peak_mb" if res["minidpo"]["gpu_peak_mb"] else "peak_mb"  # the memory that binds
    mem_ratio = res["minidpo"][memory] / res["trl"][memory]
    n = args.rounds * args.steps

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_model()})"
    reward = "reward model (policy + score head)" if reward_model else "brevity rule"
    print(f"model {args.shape or MODEL} {'bf16 autocast' if args.bf16 else 'fp32'} | {device} | "
          f"threads {args.threads} | " + " | ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{args.batch} prompts x 2 completions x <= {args.new_tokens} new tokens, max_length {args.max_length}, "
          f"temperature {TEMPERATURE}, {reward}; medians of {n} steps ({args.rounds} rounds x {args.steps}, "
          f"1 warm-up each)" + ("; TRL with minidpo's glibc setting" if args.trl_keep_freed_memory else ""))
    print(f"{time.strftime('%Y-%m-%d')} | minidpo's fp32 CPU matmul: {runs['minidpo'][0]['cpu_matmul']}")
    gpu = memory == "gpu_peak_mb"
    print(f"{'':10}{'s/step':>8}{'min':>7}{'max':>7}{'peak MB':>9}" + (f"{'GPU peak MB':>13}" if gpu else "")
          + f"{'tokens/completion':>19}")
    for side, r in res.items():
        print(f"{side:10}{r['s_per_step']:8.2f}{r['min']:7.2f}{r['max']:7.2f}{r['peak_mb']:9.0f}"
              + (f"{r['gpu_peak_mb']:13.0f}" if gpu else "") + f"{r['tokens']:19.1f}")
    print(f"minidpo / TRL: {ratio:.2f}x time per step, {mem_ratio:.2f}x peak {'GPU ' if gpu else ''}memory"
          + (" (both LoRA)" if args.peft else ""))
    if args.peft:
        lora_vs_full = {"time_ratio": res["minidpo"]["s_per_step"] / res["full"]["s_per_step"],
                        "peak_ratio": res["minidpo"][memory] / res["full"][memory]}
        print(f"minidpo LoRA / minidpo full fine-tuning: {lora_vs_full['time_ratio']:.2f}x time per step, "
              f"{lora_vs_full['peak_ratio']:.2f}x peak {'GPU ' if gpu else ''}memory")
    print("seconds (share of the step):")
    print(f"{'':10}" + "".join(f"{k:>20}" for k in res["minidpo"]["breakdown"]))
    for side, r in res.items():
        print(f"{side:10}" + "".join(f"{v:11.2f} ({v / r['s_per_step']:4.0%})" for v in r["breakdown"].values()))
    if args.json:
        print(json.dumps({
            "minidpo_s_per_step": res["minidpo"]["s_per_step"], "trl_s_per_step": res["trl"]["s_per_step"],
            "ratio": ratio, "minidpo_peak_mb": res["minidpo"]["peak_mb"], "trl_peak_mb": res["trl"]["peak_mb"],
            "minidpo_gpu_peak_mb": res["minidpo"]["gpu_peak_mb"], "trl_gpu_peak_mb": res["trl"]["gpu_peak_mb"],
            "peak_ratio": mem_ratio, "minidpo_breakdown_s": res["minidpo"]["breakdown"],
            "trl_breakdown_s": res["trl"]["breakdown"],
            "minidpo_tokens_per_completion": res["minidpo"]["tokens"], "trl_tokens_per_completion": res["trl"]["tokens"],
            "batch": args.batch, "max_new_tokens": args.new_tokens, "max_length": args.max_length,
            "temperature": TEMPERATURE, "reward": args.reward, "bf16": args.bf16, "shape": args.shape,
            "trl_keep_freed_memory": args.trl_keep_freed_memory, "threads": args.threads, "steps": n,
            "peft": args.peft, **({"full_s_per_step": res["full"]["s_per_step"], "full_peak_mb": res["full"]["peak_mb"],
                                   "full_gpu_peak_mb": res["full"]["gpu_peak_mb"],
                                   "lora_vs_full": lora_vs_full} if args.peft else {}),
            "model": args.shape or MODEL, "device_name": device, **versions, "date": time.strftime("%Y-%m-%d"),
            "cpu_matmul": [r["cpu_matmul"] for r in runs["minidpo"]],
        }))


if __name__ == "__main__":
    main()
