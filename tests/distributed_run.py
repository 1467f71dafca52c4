"""The rank side of tests/test_distributed.py: `torchrun --nproc_per_node=2 tests/distributed_run.py MODE
WORLD OUT` (or plain `python` for one process). WORLD is a JSON file of the tiny models' and
datasets' paths; results go to OUT as files that the test reads.

equivalence: one optimizer step on fixed completions (no sampling), recording the all-reduced
  loss, the full gradients and the updated weights; again with --gradient_checkpointing and with
  --num_generations 4; and one real step under --bf16.
runs: a 4-step run saving checkpoint-2, a run resumed from it, and the reference's Pythia 1B
  command through train.main, with each rank's unreduced metric window kept for the test.
lora: equivalence's first step and runs' kill-and-resume, with LoRA adapters.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py; fakes.py is beside this file

import train  # noqa: E402
from fakes import FixedSampler  # noqa: E402
from minidpo.config import parse_args  # noqa: E402
from minidpo.data import load_prompts  # noqa: E402
from minidpo.distributed import all_reduce_sum, full_state_dict, shutdown  # noqa: E402
from minidpo.trainer import Trainer  # noqa: E402

RULE = ["--reward_funcs", "minidpo.judges:brevity"]


def flags(world, out, *extra):
    return [str(a) for a in ["--model_name_or_path", world["llama"], "--dataset_name", world["prompts"],
                             "--output_dir", out, "--max_new_tokens", 8, "--max_length", 64, "--logging_steps", 1,
                             "--save_steps", 0, *RULE, *extra]]


def one_step(world, out, tag, batch, accumulation, *extra):
    """One optimizer step on a fixed split of the first 8 prompts: rank r, micro-batch m takes the
    `batch` prompts starting at (r * accumulation + m) * batch, so the ranks cover them in order."""
    trainer = Trainer(parse_args(flags(world, out / tag, "--per_device_train_batch_size", batch,
                                       "--gradient_accumulation_steps", accumulation, "--max_steps", 1, *extra)))
    trainer.sampler = FixedSampler(4, trainer.tokenizer.vocab_size)
    prompts = load_prompts(world["prompts"])
    rank = trainer.dist.rank
    batches = [(0, prompts[(rank * accumulation + m) * batch:][:batch]) for m in range(accumulation)]
    grads, optimizer_step = {}, trainer.optimizer.step

    def step_keeping_gradients(*args, **kwargs):
        for name, p in trainer.policy.named_parameters():
            if p.grad is None:  # a frozen weight (LoRA's base)
                continue
            grads[name] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step_keeping_gradients
    metrics, grad_norm = trainer.train_step(batches)
    loss = all_reduce_sum(torch.stack([metrics["loss"][0], metrics["loss"][1]]))
    weights = full_state_dict(trainer.policy)
    if rank == 0:
        save_file({f"grad.{k}": v.contiguous() for k, v in grads.items()}
                  | {f"weight.{k}": v.contiguous() for k, v in weights.items()}, out / f"{tag}.safetensors")
        (out / f"{tag}.json").write_text(json.dumps({"loss": (loss[0] / loss[1]).item(),
                                                     "grad_norm": grad_norm.item()}))
    return trainer


def equivalence(world, out):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # the same 8 prompts in one batch of one process
        one_step(world, out, "single", 8, 1)
        one_step(world, out, "single_best_of_4", 8, 1, "--num_generations", 4)
        return
    one_step(world, out, "plain", 2, 2)
    one_step(world, out, "best_of_4", 2, 2, "--num_generations", 4)
    one_step(world, out, "checkpointed", 2, 2, "--gradient_checkpointing")
    # A real rollout under --bf16: the gathered weights are bf16 and so must the KV cache be.
    trainer = Trainer(parse_args(flags(world, out / "bf16", "--per_device_train_batch_size", 2, "--max_steps", 1,
                                       "--bf16")))
    metrics, _ = trainer.train_step([next(trainer.micro_batches())])
    if trainer.dist.rank == 0:
        (out / "bf16.json").write_text(json.dumps({"cache_dtype": str(trainer.sampler.cache.k[0].dtype),
                                                   "loss": float(metrics["loss"][0] / metrics["loss"][1])}))


def lora(world, out):
    """equivalence's first step and runs' kill-and-resume, with LoRA adapters on q, v and up."""
    adapters = ["--use_peft", "--lora_r", 4, "--lora_target_modules", "q_proj", "v_proj", "up_proj"]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        one_step(world, out, "single", 8, 1, *adapters)
        return
    one_step(world, out, "plain", 2, 2, *adapters)
    one_step(world, out, "bf16_base", 2, 2, *adapters, "--torch_dtype", "bfloat16")  # bf16 base, fp32 adapters
    straight = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 4,
                "--save_steps", 2, "--learning_rate", 1e-2, *adapters]
    Trainer(parse_args(flags(world, out / "straight", *straight))).train()
    Trainer(parse_args(flags(world, out / "resumed", *straight, "--resume_from_checkpoint",
                             out / "straight" / "checkpoint-2"))).train()


def runs(world, out):
    straight = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 4,
                "--save_steps", 2, "--learning_rate", 1e-3]
    Trainer(parse_args(flags(world, out / "straight", *straight))).train()
    Trainer(parse_args(flags(world, out / "resumed", *straight, "--resume_from_checkpoint",
                             out / "straight" / "checkpoint-2"))).train()

    # The reference's 1B command with tiny local stand-ins; each rank keeps its own metric window.
    log = Trainer.log

    def log_keeping_window(self, window, last, seconds):
        rows = {name: [float(s), float(c)] for name, (s, c) in window.totals.items()}
        with open(out / f"window-rank{self.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps(rows) + "\n")
        return log(self, window, last, seconds)

    Trainer.log = log_keeping_window
    argv = ["--model_name_or_path", world["llama"], "--reward_model_path", world["llama_rm"],
            "--dataset_name", world["prompts"], "--learning_rate", "5.0e-7",
            "--output_dir", out / "pythia-1b-deduped-tldr-online-dpo", "--beta", "0.1",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--num_train_epochs", "3",
            "--max_new_tokens", "53", "--warmup_ratio", "0.1", "--missing_eos_penalty", "1.0",
            "--logging_steps", "20", "--save_steps", "0.1", "--max_steps", "2"]
    code = train.main([str(a) for a in argv])  # shuts the process group down at the end
    (out / f"exit-rank{os.environ['RANK']}").write_text(str(code))


if __name__ == "__main__":
    mode, world, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    torch.set_num_threads(1)
    try:
        {"equivalence": equivalence, "runs": runs, "lora": lora}[mode](world, out)
    finally:
        shutdown()
