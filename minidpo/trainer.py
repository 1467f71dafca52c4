"""The online DPO loop (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

One optimizer step (Trainer.train_step), for each of gradient_accumulation_steps micro-batches:
  1. rollout: 2 completions per prompt, sampled from the policy's current weights;
  2. preference: a pairwise judge's verdict, or scores from a reward model / reward functions
     (minus missing_eos_penalty for completions without EOS), pick chosen and rejected;
  3. log-probs of both completions under the policy (with grad) and the frozen reference;
  4. the DPO (sigmoid) or IPO loss, backward.
Then clip the gradient norm, step AdamW and the learning-rate schedule.

Written for torchrun from the start: each rank trains on its own shard of the prompts with its
own sampling seed, and metrics travel as (sum, count) pairs reduced over ranks before logging.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from . import judges
from .checkpoint import check_vocabulary, load_model, replace_dir, resolve, write_pretrained
from .config import Config, interval
from .cpu import keep_freed_memory
from .data import PromptSampler, load_preferences, load_prompts
from .distributed import all_reduce_sum, barrier, full_state_dict, gathered, init_distributed, shard
from .model import last_token_scores
from .loss import add_metrics, bradley_terry_loss, dpo_loss, metric_means, online_dpo_metrics
from .packing import pack_pairs
from .sampler import Sampler
from .tokenizer import Tokenizer
from .tracking import Tracker, error_line


# Without a process group (one process), DCP warns at every save and load that it assumes one process:
# that is the intent, and the warning's two lines would bury the log and the one-line errors.
DCP_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


class TrainingError(RuntimeError):
    pass


def lr_lambda(kind: str, warmup: int, total: int):
    """The learning-rate multiplier at each optimizer step, as HF's schedulers define it."""
    def factor(step: int) -> float:
        if step < warmup and kind != "constant":
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1 - progress)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0  # constant, constant_with_warmup
    return factor


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = init_distributed()
        device = self.dist.device
        if device.type == "cpu":
            keep_freed_memory()  # each step's large tensors reuse the last step's pages (cpu.py)
        torch.manual_seed(cfg.seed)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

        model_dir = resolve(cfg.model_name_or_path)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        if cfg.objective == "reward":
            # A causal LM becomes a reward model: same body, a fresh one-output `score` head.
            self.policy = shard(load_model(str(model_dir), device=device, num_labels=1), self.dist, cfg.bf16)
            rows = load_preferences(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_config)
        else:
            self.policy = load_model(str(model_dir), device=device)
            # The frozen reference pi_ref, in the policy's dtype and under the same autocast, so that
            # the two agree exactly (KL 0) before the first step.
            self.reference = load_model(str(model_dir), device=device).requires_grad_(False)
            # With several processes both are sharded (FSDP2) before the optimizer sees the policy's
            # parameters; the reference has no gradients and no optimizer state, only its shards.
            shard(self.policy, self.dist, cfg.bf16)
            shard(self.reference, self.dist, cfg.bf16, frozen=True)
            self.sampler = Sampler(self.policy, cuda_graphs=cfg.cuda_graphs,
                                   dtype=torch.bfloat16 if cfg.bf16 else None)
            if device.type == "cuda":  # size the cache for the longest sequence now: growing it recaptures graphs
                with gathered(self.policy):
                    self.sampler.reserve(2 * cfg.per_device_train_batch_size, cfg.max_length)
            # Each rank samples from its own seeded generator, saved in checkpoints so a resumed run
            # draws the same completions as an uninterrupted one.
            self.generator = torch.Generator(device).manual_seed(cfg.seed + 1000 * self.dist.rank)
            self.preference = Preference(cfg, device)
            for scorer in self.preference.scorers:
                if isinstance(scorer, judges.RewardModel):
                    shard(scorer.model, self.dist, cfg.bf16, frozen=True)
            rows = load_prompts(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_config)
        check_vocabulary(self.tokenizer, self.policy.cfg, model_dir)
        self.policy.gradient_checkpointing = cfg.gradient_checkpointing
        self.data = PromptSampler(rows, cfg.per_device_train_batch_size, self.dist.rank, self.dist.world_size,
                                  cfg.seed)

        steps_per_epoch = max(1, self.data.batches_per_epoch // cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, self.total_steps))
        self.step = 0  # optimizer steps taken
        self.output_dir = Path(cfg.output_dir)
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(self.find_checkpoint(cfg.resume_from_checkpoint))
        self.tracker = Tracker(cfg, self.output_dir, enabled=self.dist.is_main, resume_step=self.step)

    # ---- the data: micro-batch m of the whole run is batch m % B of epoch m // B ----

    def micro_batches(self):
        """This rank's micro-batches from where the run stands (after a resume too)."""
        per_epoch = self.data.batches_per_epoch
        m = self.step * self.cfg.gradient_accumulation_steps
        while True:
            epoch, start = divmod(m, per_epoch)
            for batch in self.data.batches(epoch, start):
                yield epoch, batch
            m = (epoch + 1) * per_epoch

    # ---- one optimizer step ----

    def train(self):
        cfg = self.cfg
        log_every, save_every = interval(cfg.logging_steps, self.total_steps), interval(cfg.save_steps, self.total_steps)
        batches = self.micro_batches()
        window, started = {}, time.perf_counter()
        while self.step < self.total_steps:
            learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses
            metrics = self.train_step(batches)
            grad_norm = metrics.pop("grad_norm")[0]
            add_metrics(window, metrics)
            self.step += 1
            if self.step % log_every == 0 or self.step == self.total_steps or (cfg.logging_first_step and self.step == 1):
                # As HF's Trainer logs them: the last step's grad_norm and learning rate, not the
                # window's means, and the epochs done so far as a fraction.
                epochs_done = self.step * cfg.gradient_accumulation_steps / self.data.batches_per_epoch
                last = {"grad_norm": grad_norm.item(), "learning_rate": learning_rate, "epoch": epochs_done}
                self.log(window, last, time.perf_counter() - started)
                window, started = {}, time.perf_counter()
            if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        self.save_final()
        self.tracker.close()

    def train_step(self, batches) -> dict:
        cfg = self.cfg
        metrics = {}
        # Pairs per rank in a step when every pair counts: each micro-batch's summed loss is divided
        # by it, so the gradient is already the mean when no pair is left undecided.
        expected_pairs = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        for i in range(cfg.gradient_accumulation_steps):
            epoch, batch = next(batches)
            if self.dist.world_size > 1:  # FSDP: reduce-scatter the gradients once, after the last micro-batch
                self.policy.set_requires_gradient_sync(i == cfg.gradient_accumulation_steps - 1)
            beta = cfg.beta[min(epoch, len(cfg.beta) - 1)]  # a list of betas gives one per epoch
            micro_step = self.reward_micro_step if cfg.objective == "reward" else self.online_dpo_micro_step
            loss_sum, pairs, micro_metrics = micro_step(batch, beta)
            self.stop_unless_finite("loss", loss_sum)
            (loss_sum / expected_pairs).backward()
            micro_metrics["loss"] = (loss_sum.detach(), pairs)
            add_metrics(metrics, micro_metrics)
        # The step's loss is the mean over the pairs of all its micro-batches on all ranks (pairs the
        # judge left undecided do not count), the same however the batch is split. FSDP averaged the
        # gradients over the ranks, so they are the sum over pairs / (world_size * expected_pairs):
        # rescaled when fewer pairs counted.
        counted_pairs = all_reduce_sum(metrics["loss"][1].clone()).clamp(min=1).item()
        if counted_pairs != self.dist.world_size * expected_pairs:
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, self.dist.world_size * expected_pairs / counted_pairs)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # under FSDP: the norm over all shards, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        self.stop_unless_finite("gradient norm", grad_norm)
        metrics["grad_norm"] = (grad_norm.detach().float(), torch.tensor(1.0, device=grad_norm.device))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def stop_unless_finite(self, name: str, value: torch.Tensor):
        if not torch.isfinite(value):
            raise TrainingError(f"the {name} is {value.item()} at step {self.step + 1}; stopping before it "
                                f"reaches the weights (checkpoints already written are intact)")

    def online_dpo_micro_step(self, prompts: list, beta: float):
        cfg, tok = self.cfg, self.tokenizer
        B = len(prompts)
        # 1. Rollout. Prompts keep their last max_length - max_new_tokens tokens, so each completion
        # is scored on exactly the context it was sampled from (the reference cuts only when scoring).
        texts = [render_prompt(tok, p) for p in prompts]
        prompt_ids, prompt_mask = tok(texts, add_special_tokens=[isinstance(p, str) for p in prompts],
                                      max_length=cfg.max_length - cfg.max_new_tokens)
        with gathered(self.policy):  # under FSDP: the full weights once per rollout, not once per token
            out = self.sampler.generate(
                prompt_ids, prompt_mask, n=2, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id, generator=self.generator)
        completions = tok.batch_decode(out.ids.tolist())  # rows 2b and 2b+1 belong to prompt b

        # 2. Preference: which of each prompt's two completions is chosen; undecided pairs are dropped.
        first_wins, valid, scores = self.preference(prompts, completions, out.has_eos.cpu())
        chosen_rows, rejected_rows = 2 * torch.arange(B) + (~first_wins).long(), 2 * torch.arange(B) + first_wins.long()
        if cfg.log_completions_steps and (self.step + 1) % cfg.log_completions_steps == 0:
            self.tracker.log_completions(self.step + 1, [
                {"prompt": texts[b], "chosen": completions[chosen_rows[b]], "rejected": completions[rejected_rows[b]],
                 "decided": bool(valid[b]), **({} if scores is None else {
                     "chosen_score": scores[chosen_rows[b]].item(), "rejected_score": scores[rejected_rows[b]].item()})}
                for b in range(B)])
        device = out.ids.device
        valid = valid.to(device)
        chosen_rows, rejected_rows = chosen_rows.to(device), rejected_rows.to(device)
        order = torch.cat([chosen_rows, rejected_rows])  # [2B]: the B chosen, then the B rejected

        # 3. Log-probs of the completion tokens, each prompt once with its two completions (packing.py).
        completion_ids, completion_mask = out.ids[order], out.mask[order]
        pairs = pack_pairs(prompt_ids.to(device), prompt_mask.to(device), completion_ids[:B], completion_ids[B:])
        inputs = dict(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask, positions=pairs.positions,
                      logits_to_keep=pairs.predicting)  # with targets: log-probs, never the full logits
        with self.autocast:
            # The reference first: its passing tensors are freed before the policy's activations pile up.
            with torch.no_grad():
                ref_logps = self.reference(**inputs, targets=pairs.targets)
            logps = self.policy(**inputs, targets=pairs.targets)
        # [B, 2C] (chosen | rejected) -> [2B, C] (chosen rows, then rejected rows)
        logps, ref_logps = torch.cat(logps.chunk(2, dim=1)), torch.cat(ref_logps.chunk(2, dim=1))
        mask = completion_mask.float()
        seq, ref_seq = (logps * mask).sum(1), (ref_logps * mask).sum(1)

        # 4. The loss on this fresh preference, summed over the decided pairs (train_step divides).
        loss_sum, pairs = dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta, cfg.loss_type, valid)
        metrics = online_dpo_metrics(logps, ref_logps, completion_mask, out.has_eos[order], beta, valid,
                                     None if scores is None else scores.to(device)[order])
        one = torch.tensor(1.0, device=device)
        metrics["judge/undecided"] = ((~valid).float().sum(), one * B)
        metrics["completions/tokens"] = (mask.sum(), one)
        return loss_sum, pairs, metrics

    def reward_micro_step(self, rows: list, beta: float):
        """Bradley-Terry reward-model training: loss -log sigma(r_chosen - r_rejected)."""
        tok = self.tokenizer
        texts = [judges.render_completion(tok, row["prompt"], row[side])
                 for side in ("chosen", "rejected") for row in rows]
        plain = [isinstance(row["prompt"], str) for row in rows] * 2  # texts: all chosen, then all rejected
        ids, mask = tok(texts, padding_side="right", add_special_tokens=plain, max_length=self.cfg.max_length)
        device = self.dist.device
        with self.autocast:
            scores = last_token_scores(self.policy(ids.to(device), mask.to(device)), mask.to(device))[:, 0]
        B = len(rows)
        loss, accuracy, margin = bradley_terry_loss(scores[:B].float(), scores[B:].float())
        pairs = torch.tensor(float(B), device=device)
        return loss * B, pairs, {"rewards/accuracies": (accuracy * B, pairs), "rewards/margins": (margin * B, pairs)}

    # ---- logging ----

    def log(self, window: dict, last: dict, seconds: float):
        """window: {name: (sum, count)} over the steps since the last log, on this rank; last: values
        of the last step, the same on every rank."""
        names = sorted(window)
        packed = torch.tensor([[float(window[n][0]), float(window[n][1])] for n in names], dtype=torch.float64)
        packed = all_reduce_sum(packed.to(self.dist.device)).cpu()
        means = metric_means({n: (packed[i, 0], packed[i, 1]) for i, n in enumerate(names)}) | last
        tokens = means.pop("completions/tokens", None)
        if tokens is not None:  # a mean per micro-batch per rank; times their count is the window's total
            count = packed[names.index("completions/tokens"), 1].item()
            means["tokens_per_second"] = tokens * count / seconds
        means["step_time"] = seconds / max(1, self.step - self.tracker.last_logged_step)
        if self.dist.device.type == "cuda":
            means["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if hasattr(self, "sampler"):  # should stay at one per batch size: weights change in place
                means["sampler/graph_captures"] = self.sampler.captures
        self.tracker.log(self.step, self.total_steps, means)

    # ---- checkpoints ----

    def save_checkpoint(self):
        """output_dir/checkpoint-N: the policy in the HF layout, plus what resuming needs (model and
        optimizer state, schedule, RNG, data position), built under a temporary name and renamed."""
        final = self.output_dir / f"checkpoint-{self.step}"
        tmp = self.output_dir / f".checkpoint-{self.step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_state, optim_state = get_state_dict(self.policy, self.optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state")
        rng = {"generator": self.generator.get_state()} if hasattr(self, "generator") else {}
        save_file(rng | {"torch": torch.get_rng_state()}, tmp / f"rng-rank{self.dist.rank}.safetensors")
        full = full_state_dict(self.policy)  # a collective: every rank takes part, rank 0 gets the tensors
        if self.dist.is_main:
            write_pretrained(full, self.policy.cfg, tmp, self.tokenizer)
            state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "world_size": self.dist.world_size,
                     "config": self.cfg.to_dict()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        barrier()
        if self.dist.is_main:
            replace_dir(tmp, final)
            self.prune_checkpoints()
        barrier()

    def checkpoints(self) -> list[Path]:
        """output_dir's checkpoint-N directories, oldest first (other names, e.g. checkpoint-best, are left be)."""
        found = [p for p in self.output_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def prune_checkpoints(self):
        limit = self.cfg.save_total_limit
        for old in self.checkpoints()[: -limit] if limit else []:
            shutil.rmtree(old)

    def find_checkpoint(self, where: str) -> Path:
        if where.lower() in ("true", "last", "latest"):  # HF's --resume_from_checkpoint True: the newest one
            checkpoints = self.checkpoints()
            if not checkpoints:
                raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint-* in {self.output_dir}")
            return checkpoints[-1]
        path = Path(where)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a minidpo checkpoint "
                                    "(no trainer_state.json)")
        return path

    def load_checkpoint(self, path: Path):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--resume_from_checkpoint: cannot read {path / 'trainer_state.json'} ({e})") from None
        if not (isinstance(state, dict) and {"step", "world_size", "scheduler"} <= state.keys()):
            # e.g. a checkpoint of HF's Trainer, whose trainer_state.json holds other things
            raise ValueError(f"--resume_from_checkpoint: {path} was not written by minidpo "
                             "(its trainer_state.json lacks step, world_size or scheduler)")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"--resume_from_checkpoint: {path} was written by {state['world_size']} process(es); "
                             f"resume with the same number (this run has {self.dist.world_size})")
        model_state, optim_state = get_state_dict(self.policy, self.optimizer)
        both = {"model": model_state, "optim": optim_state}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
                dcp.load(both, checkpoint_id=path / "state")
            rng = load_file(path / f"rng-rank{self.dist.rank}.safetensors")
        except (Exception, dcp.CheckpointException) as e:
            # DCP wraps each rank's error in a CheckpointException, a BaseException: name the one inside.
            if isinstance(e, dcp.CheckpointException):
                e = next(iter(e.failures.values()))[0]
            raise ValueError(f"--resume_from_checkpoint: {path} is unreadable ({error_line(e)})") from None
        set_state_dict(self.policy, self.optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
        if "generator" in rng:
            self.generator.set_state(rng["generator"])
        self.step = state["step"]

    def save_final(self):
        """The trained model in output_dir itself, in the HF layout, with a short model card."""
        full = full_state_dict(self.policy)  # a collective: every rank takes part, rank 0 gets the tensors
        if self.dist.is_main:
            tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=self.output_dir))
            write_pretrained(full, self.policy.cfg, tmp, self.tokenizer)
            (tmp / "README.md").write_text(model_card(self.cfg, self.step, self.tracker.last_metrics))
            publish(tmp, self.output_dir)
            print(f"saved the model to {self.output_dir}", file=sys.stderr)
        barrier()
        if self.cfg.push_to_hub and self.dist.is_main:
            push_to_hub(self.output_dir, self.cfg)


class Preference:
    """Step 2 of the loop: which completion of each prompt's pair is chosen.

    A judge compares the two (-1, undecided, drops the pair). A reward model and/or reward
    functions score each completion; completions without EOS lose missing_eos_penalty; the higher
    score wins, the first on a tie, as in the reference.
    """

    def __init__(self, cfg: Config, device):
        self.judge, self.scorers, self.penalty = None, [], cfg.missing_eos_penalty
        if cfg.judge:
            options = {}
            if cfg.judge == "llm":
                options = {"path": cfg.judge_model or cfg.model_name_or_path, "device": device}
                if cfg.judge_instruction:
                    options["instruction"] = cfg.judge_instruction
            self.judge = judges.make_judge(cfg.judge, **options)
        if cfg.reward_model_path:
            self.scorers.append(judges.RewardModel.from_pretrained(
                cfg.reward_model_path, dtype=torch.bfloat16 if cfg.bf16 else None, device=device,
                max_length=cfg.max_length))
        if cfg.reward_funcs:
            self.scorers.append(judges.RewardFunctions([judges.load_reward_function(f) for f in cfg.reward_funcs]))

    def __call__(self, prompts: list, completions: list[str], has_eos: torch.Tensor):
        """(first_wins [B] bool, valid [B] bool, scores [2B] or None); completions 2b, 2b+1 answer prompt b."""
        B = len(prompts)
        if self.judge is not None:
            pairs = [(completions[2 * b], completions[2 * b + 1]) for b in range(B)]
            verdicts = torch.tensor(self.judge.judge([judges.prompt_text(p) for p in prompts], pairs))
            return verdicts == 0, verdicts != -1, None
        rows = [p for p in prompts for _ in range(2)]
        scores = sum(scorer(rows, completions).float().cpu() for scorer in self.scorers)
        if self.penalty:
            scores = scores - self.penalty * (~has_eos).float()
        pairs = scores.view(B, 2)
        return pairs[:, 0] >= pairs[:, 1], torch.ones(B, dtype=torch.bool), scores


def render_prompt(tokenizer: Tokenizer, prompt) -> str:
    """A conversational prompt goes through the chat template, ending with the assistant's turn."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)


def publish(tmp: Path, target: Path):
    """Move the files of tmp into target, replacing those of an earlier model.

    target holds checkpoints and logs too, so it cannot be swapped whole like a checkpoint. A single
    weights file replaces the old one in one rename. Shards cannot: the old weights go first and the
    new index comes last but config.json, so a crash in between leaves an incomplete model that no
    loader accepts, never old and new shards mixed.
    """
    index = "model.safetensors.index.json"
    sharded = (tmp / index).exists()
    for old in [target / index, *target.glob("model*.safetensors")]:
        if old.exists() and (sharded or not (tmp / old.name).exists()):
            old.unlink()
    move_order = {index: 1, "config.json": 2}  # everything else (0) first
    for f in sorted(tmp.iterdir(), key=lambda p: move_order.get(p.name, 0)):
        os.replace(f, target / f.name)
    tmp.rmdir()


def model_card(cfg: Config, steps: int, metrics: dict) -> str:
    judge = cfg.judge or cfg.reward_model_path or ", ".join(cfg.reward_funcs or [])
    lines = [
        "---", "library_name: minidpo", "tags: [online-dpo, minidpo]", "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"Trained with minidpo's online DPO ({cfg.loss_type} loss) from `{cfg.model_name_or_path}` on "
        f"`{cfg.dataset_name}` for {steps} steps; preferences from `{judge}`.", "",
        "| setting | value |", "| --- | --- |",
    ]
    for name in ("learning_rate", "beta", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_new_tokens", "max_length", "temperature", "missing_eos_penalty", "bf16", "seed"):
        lines.append(f"| {name} | {getattr(cfg, name)} |")
    if metrics:
        lines += ["", "Last logged metrics:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def push_to_hub(output_dir: Path, cfg: Config):
    from huggingface_hub import HfApi

    repo_id = cfg.hub_model_id or output_dir.name
    try:
        api = HfApi(token=cfg.hub_token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=output_dir,
                          ignore_patterns=["checkpoint-*", ".*", "metrics.jsonl", "completions.jsonl", "runs/*"])
    except Exception as e:
        raise TrainingError(f"--push_to_hub: upload to {repo_id!r} failed ({error_line(e)}); "
                            f"the model is saved in {output_dir}") from None
