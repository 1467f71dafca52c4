"""The online DPO loop (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

Read one optimizer step top to bottom, in this file:

    train_step   collect, then learn:
      rollout      for each micro-batch, under one gather of the policy's weights: render and tokenize the
                   prompts, sample --num_generations completions per prompt from the current weights and pick
                   the chosen and the rejected (a judge, or reward scores minus missing_eos_penalty): a Rollout.
      (count)      the decided pairs of the whole step, over all micro-batches and ranks, once.
      learn        for each micro-batch: log-probs of both completions under the policy (with grad) and the
                   reference, the loss summed over the decided pairs, divided by the step's count, backward.
      update       clip the gradient norm, step AdamW and the learning-rate schedule.

No weight changes between the micro-batches of a step, so collecting every rollout first changes no result; it
makes the loss the step's mean over its decided pairs with one division and no rescale.

Written for torchrun: each rank trains on its own shard of the prompts with its own sampling seed, gradients are summed
over ranks (FSDP's divide factor is 1: the loss is divided by the step's count) and metrics travel as (sum, count)
pairs. Checkpoints and the final model: outputs.py. Reward-model training shares this loop: reward_trainer.py."""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

from .checkpoint import check_vocabulary, load_model, resolve
from .config import Config, interval
from .cpu import keep_freed_memory
from .data import PromptSampler, load_prompts
from .distributed import all_reduce_sum, gathered, init_distributed, shard
from .judges import Preference, RewardModel
from .lora import LoraSpec, adapters_disabled, adapters_merged, add_adapters, model_dtype
from .loss import dpo_loss, online_dpo_metrics
from .outputs import Checkpoints, model_card, push_to_hub, save_final
from .packing import pack
from .sampler import Sampler
from .tokenizer import Tokenizer
from .tracking import Metrics, Tracker


class TrainingError(RuntimeError):
    pass


def lr_lambda(kind: str, warmup: int, total: int):
    """The learning-rate multiplier at each optimizer step, as HF's schedulers define it."""
    def factor(step: int) -> float:
        if step < warmup and kind != "constant":
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
        return decay.get(kind, 1.0)  # constant, constant_with_warmup: 1
    return factor


@dataclass
class Rollout:
    """One micro-batch of B prompts after sampling and judging: the one row layout the learning
    phase reads. Row b is prompt b; along the second axis its completions, the chosen (0), the
    rejected (1), then (with --num_generations n > 2, in has_eos and scores only) the others."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real tokens
    completion_ids: torch.Tensor  # [B, 2, C] right-padded after each completion's EOS
    completion_mask: torch.Tensor  # [B, 2, C] 1 on completion tokens, the EOS included
    has_eos: torch.Tensor  # [B, n] bool, every sample: the completion ended with EOS within max_new_tokens
    scores: torch.Tensor | None  # [B, n] reward scores (missing-EOS penalty included); None with a judge
    decided: torch.Tensor  # [B] bool: pairs a judge left undecided (False) count in no loss
    beta: float  # this epoch's beta


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
        self.sampler = self.generator = None  # online DPO's (build); the reward objective has none
        rows = self.build(model_dir)
        check_vocabulary(self.tokenizer, self.policy.cfg, model_dir)
        self.policy.gradient_checkpointing = cfg.gradient_checkpointing
        self.data = PromptSampler(rows, cfg.per_device_train_batch_size, self.dist.rank, self.dist.world_size,
                                  cfg.seed)

        # As HF's Trainer: an epoch's last step takes the batches left over, fewer if GA does not divide their number.
        self.steps_per_epoch = math.ceil(self.data.batches_per_epoch / cfg.gradient_accumulation_steps)
        from_epochs = math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else from_epochs
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        # As HF's Trainer: biases and norm weights are not decayed.
        groups = [{"params": [p for name, p in self.policy.named_parameters()
                              if p.requires_grad and (name.endswith(".bias") or "norm" in name) == exempt],
                   "weight_decay": 0.0 if exempt else cfg.weight_decay} for exempt in (False, True)]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, self.total_steps))
        self.step = 0  # optimizer steps taken
        self.checkpoints = Checkpoints(cfg.output_dir, self.dist, cfg.save_total_limit)
        if cfg.resume_from_checkpoint:
            self.step = self.checkpoints.load(self.checkpoints.find(cfg.resume_from_checkpoint), self.policy,
                                              self.optimizer, self.scheduler, self.generator)
        self.tracker = Tracker(cfg, self.checkpoints.output_dir, enabled=self.dist.is_main, resume_step=self.step)

    def build(self, model_dir) -> list:
        """The policy, its frozen reference, the sampler and the preference; returns the prompt rows."""
        cfg, device = self.cfg, self.dist.device
        dtype = model_dtype(cfg.torch_dtype, model_dir)
        self.policy = load_model(str(model_dir), dtype=dtype, device=device)
        # The reference pi_ref: with LoRA the policy with its adapters off (reference_logps), else a frozen copy in the
        # same dtype under the same autocast, so the two agree exactly (KL 0) before the first step. SimPO has none.
        self.reference = None
        if cfg.use_peft:
            add_adapters(self.policy, LoraSpec(cfg.lora_r, cfg.lora_alpha, 0.0 if cfg.disable_dropout else cfg.lora_dropout,
                                               cfg.lora_target_modules, cfg.use_rslora, cfg.model_name_or_path))
        elif cfg.loss_type != "simpo":
            self.reference = load_model(str(model_dir), dtype=dtype, device=device).requires_grad_(False)
            shard(self.reference, self.dist, cfg.bf16, frozen=True)
        # With several processes both are sharded (FSDP2) before the optimizer sees the policy's
        # parameters; the reference has no gradients and no optimizer state, only its shards.
        shard(self.policy, self.dist, cfg.bf16)
        self.sampler = Sampler(self.policy, cuda_graphs=cfg.cuda_graphs, dtype=torch.bfloat16 if cfg.bf16 else None)
        if device.type == "cuda":  # size the cache for the longest sequence now: growing it recaptures graphs
            with gathered(self.policy), adapters_merged(self.policy):  # as every rollout will run
                self.sampler.reserve(cfg.num_generations * cfg.per_device_train_batch_size, cfg.max_length)
        # Each rank's own seeded sampling generator, checkpointed: a resumed run draws what an uninterrupted one would.
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 1000 * self.dist.rank)
        self.preference = Preference(cfg, device)
        for scorer in self.preference.scorers:
            if isinstance(scorer, RewardModel):
                shard(scorer.model, self.dist, cfg.bf16, frozen=True)
        return load_prompts(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_config)

    # ---- the data: step s is step s % S of epoch s // S; each but an epoch's last takes GA batches ----

    def micro_batches(self):
        """(epoch, batch) of this rank's micro-batches from where the run stands (after a resume too)."""
        epoch, step = divmod(self.step, self.steps_per_epoch)
        start = step * self.cfg.gradient_accumulation_steps
        while True:
            for batch in self.data.batches(epoch, start):
                yield epoch, batch
            epoch, start = epoch + 1, 0

    def batches_in_step(self, step: int) -> int:
        """How many micro-batches optimizer step `step` (from 0) takes: GA, or what its epoch has left."""
        done = step % self.steps_per_epoch * self.cfg.gradient_accumulation_steps
        return min(self.cfg.gradient_accumulation_steps, self.data.batches_per_epoch - done)

    def epochs_done(self, steps: int) -> float:
        """Epochs done after `steps` optimizer steps, as HF logs them: a fraction of the epoch's batches."""
        epoch, step = divmod(steps, self.steps_per_epoch)
        return epoch + step * self.cfg.gradient_accumulation_steps / self.data.batches_per_epoch

    # ---- the loop ----

    def train(self):
        cfg = self.cfg
        log_every, save_every = interval(cfg.logging_steps, self.total_steps), interval(cfg.save_steps, self.total_steps)
        batches = self.micro_batches()
        window, started = Metrics(), time.perf_counter()
        while self.step < self.total_steps:
            learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses
            metrics, grad_norm = self.train_step([next(batches) for _ in range(self.batches_in_step(self.step))])
            window.add(metrics)
            self.step += 1
            if self.step % log_every == 0 or self.step == self.total_steps or (cfg.logging_first_step and self.step == 1):
                # As HF's Trainer logs them: the last step's grad_norm and learning rate, not the
                # window's means, and the epochs done so far as a fraction.
                last = {"grad_norm": grad_norm.item(), "learning_rate": learning_rate,
                        "epoch": self.epochs_done(self.step)}
                self.log(window, last, time.perf_counter() - started)
                window, started = Metrics(), time.perf_counter()
            if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                self.checkpoints.save(self.step, self.policy, self.optimizer, self.scheduler, self.tokenizer,
                                      cfg.to_dict(), self.generator)
        save_final(self.checkpoints.output_dir, self.policy, self.tokenizer,
                   model_card(cfg, self.step, self.tracker.last_metrics), self.dist)
        if cfg.push_to_hub and self.dist.is_main:
            push_to_hub(self.checkpoints.output_dir, cfg.hub_model_id, cfg.hub_token)
        self.tracker.close()

    # ---- one optimizer step: collect, then learn ----

    warned_undecided = False  # train_step's warning, once a run

    def train_step(self, micro_batches: list) -> tuple[dict, torch.Tensor]:
        """One optimizer step on [(epoch, batch)] micro-batches; returns ({name: (sum, count)}, grad_norm)."""
        rollouts = self.collect(micro_batches)
        # The step's loss is the mean over the decided pairs of all its micro-batches on all ranks,
        # the same however the batch is split: count them once, before any backward.
        pairs = all_reduce_sum(sum(r.decided.sum() for r in rollouts).float().to(self.dist.device))
        # A judge that answers nothing usable (every pair -1) would let the run "succeed" having learned
        # nothing: say so at the first wholly undecided micro-batch, stop at a wholly undecided step.
        if pairs.item() == 0:  # the same count on every rank: all stop together
            raise TrainingError(f"step {self.step + 1}: the judge decided none of the step's pairs; "
                                "stopping rather than training on nothing")
        if not self.warned_undecided and any(not r.decided.any() for r in rollouts):
            print(f"warning: step {self.step + 1}: the judge decided none of a batch's pairs", file=sys.stderr)
            self.warned_undecided = True
        metrics = Metrics()
        for i, rollout in enumerate(rollouts):
            if self.dist.world_size > 1:  # FSDP: reduce-scatter the gradients once, after the last micro-batch
                self.policy.set_requires_gradient_sync(i == len(rollouts) - 1)
            metrics.add(self.learn(rollout, pairs))
        return metrics.totals, self.update()

    def collect(self, micro_batches: list) -> list[Rollout]:
        # Under FSDP: the policy's full weights once for the step's rollouts, not once per token.
        # With LoRA, the adapters merged into them (lora.py: faster decoding).
        with gathered(self.policy), adapters_merged(self.policy):
            return [self.rollout(batch, self.cfg.beta[min(epoch, len(self.cfg.beta) - 1)])
                    for epoch, batch in micro_batches]  # a list of betas gives one per epoch

    def rollout(self, batch: list[dict], beta: float) -> Rollout:
        cfg, tok = self.cfg, self.tokenizer
        prompts = [row["prompt"] for row in batch]
        # Prompts keep their last max_length - max_new_tokens tokens, so each completion is scored
        # on exactly the context it was sampled from (the reference cuts only when scoring).
        prompt_ids, prompt_mask = tok.encode_rows(prompts, max_length=cfg.max_length - cfg.max_new_tokens)
        n = cfg.num_generations
        out = self.sampler.generate(
            prompt_ids, prompt_mask, n=n, max_new_tokens=cfg.max_new_tokens, eos_token_ids=tok.eos_token_ids,
            pad_token_id=tok.pad_token_id, generator=self.generator, decode=tok.decode, **cfg.sampling())
        ids = out.ids.tolist()  # rows b*n .. b*n+n-1 answer prompt b
        state = SimpleNamespace(global_step=self.step, max_steps=self.total_steps, epoch=self.epochs_done(self.step))
        chosen, rejected, decided, scores = self.preference(batch, tok.batch_decode(ids), out.has_eos, n,
                                                            completion_ids=ids, trainer_state=state)
        # Prompt-major rows [B*n, ...] -> [B, n, ...], each prompt's chosen completion first, then the
        # rejected one, then the others (kept only for the metrics that average over all samples).
        B, device = len(prompts), out.ids.device
        key = torch.arange(n).repeat(B, 1).scatter_(1, chosen[:, None], -2).scatter_(1, rejected[:, None], -1)
        rows = (n * torch.arange(B)[:, None] + key.argsort(1)).to(device)
        rollout = Rollout(prompt_ids.to(device), prompt_mask.to(device), out.ids[rows[:, :2]], out.mask[rows[:, :2]],
                          out.has_eos[rows], None if scores is None else scores.to(device)[rows], decided.to(device),
                          beta)
        if cfg.log_completions_steps and (self.step + 1) % cfg.log_completions_steps == 0:
            self.log_completions(prompts, rollout)
        return rollout

    def learn(self, rollout: Rollout, pairs: torch.Tensor) -> dict:
        """Backpropagate one micro-batch's share of the step's loss (its decided pairs' summed loss
        divided by `pairs`, the step's count); returns its metrics {name: (sum, count)}."""
        cfg = self.cfg
        ids, mask = rollout.completion_ids, rollout.completion_mask
        B, _, C = ids.shape
        # Each prompt once with both completions in one row, [prompt | chosen | rejected] (packing.py).
        packed = pack(rollout.prompt_ids, rollout.prompt_mask, ids)
        inputs = dict(input_ids=packed.input_ids, positions=packed.positions, block_mask=packed.block_mask,
                      logits_to_keep=packed.predicting, targets=packed.targets)  # log-probs, never the full logits
        with self.autocast:
            # The reference first: its passing tensors are freed before the policy's activations pile up.
            ref_seq = None if cfg.loss_type == "simpo" else (self.reference_logps(inputs).view(B, 2, C) * mask).sum(-1)
            logps = self.policy(**inputs)
        # [B, 2C] token log-probs (chosen | rejected) -> [B, 2] sums over each completion's tokens
        seq = (logps.view(B, 2, C) * mask).sum(-1)
        mean = seq / mask.sum(-1).clamp(min=1)  # per-token means, for SimPO and the NLL term
        # SimPO compares per-token means and has no reference; the other losses compare sums against it.
        chosen, rejected = (mean if cfg.loss_type == "simpo" else seq).unbind(1)
        ref_chosen, ref_rejected = (None, None) if ref_seq is None else ref_seq.unbind(1)
        loss_sum, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, rollout.beta, cfg.loss_type,
                               rollout.decided, cfg.label_smoothing, cfg.simpo_gamma)
        if cfg.rpo_alpha:  # RPO: alpha x the chosen completion's NLL per token (Pang et al. 2024)
            loss_sum = loss_sum + cfg.rpo_alpha * torch.where(rollout.decided, -mean[:, 0], 0.0).sum()
        self.stop_unless_finite("loss", loss_sum)
        (loss_sum / pairs).backward()

        one = torch.tensor(1.0, device=ids.device)
        return online_dpo_metrics(seq, ref_seq, rollout.has_eos, rollout.beta, rollout.decided, rollout.scores) | {
            "loss": (loss_sum.detach(), rollout.decided.sum().float()),
            "judge/undecided": ((~rollout.decided).float().sum(), one * B),
            "completions/tokens": (mask.sum().float(), one)}  # of the two scored completions

    @torch.no_grad()
    def reference_logps(self, inputs: dict) -> torch.Tensor:
        """Token log-probs under pi_ref: the frozen reference model, or with LoRA the policy with its adapters off."""
        if self.reference is not None:
            return self.reference(**inputs)
        with adapters_disabled(self.policy):
            return self.policy(**inputs)

    def update(self) -> torch.Tensor:
        """Clip, step AdamW and the schedule; returns the gradient norm before clipping."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # under FSDP: the norm over all shards, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        self.stop_unless_finite("gradient norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach().float()

    def stop_unless_finite(self, name: str, value: torch.Tensor):
        if not torch.isfinite(value):
            raise TrainingError(f"the {name} is {value.item()} at step {self.step + 1}; stopping before it "
                                f"reaches the weights (checkpoints already written are intact)")

    # ---- logging ----

    def log_completions(self, prompts: list, rollout: Rollout):
        texts = self.tokenizer.batch_decode(rollout.completion_ids.flatten(0, 1).tolist())
        rows = [{"prompt": self.tokenizer.render(p), "chosen": chosen, "rejected": rejected, "decided": decided}
                for p, chosen, rejected, decided in zip(prompts, texts[::2], texts[1::2], rollout.decided.tolist())]
        if rollout.scores is not None:
            for row, (chosen, rejected) in zip(rows, rollout.scores[:, :2].tolist()):
                row |= {"chosen_score": chosen, "rejected_score": rejected}
        self.tracker.log_completions(self.step + 1, rows)

    def log(self, window: Metrics, last: dict, seconds: float):
        """window: the steps since the last log, on this rank; last: values of the last step, the same on every rank."""
        total = window.reduce(self.dist.device)
        means = total.means() | last
        tokens = means.pop("completions/tokens", None)
        if tokens is not None:  # a mean per micro-batch per rank; times their count is the window's total
            means["tokens_per_second"] = tokens * total.totals["completions/tokens"][1] / seconds
        means["step_time"] = seconds / max(1, self.step - self.tracker.last_logged_step)
        if self.dist.device.type == "cuda":
            means["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if self.sampler is not None:  # should stay at one per batch size: weights change in place
                means["sampler/graph_captures"] = self.sampler.captures
        self.tracker.log(self.step, self.total_steps, means)
