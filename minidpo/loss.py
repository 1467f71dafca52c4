"""The online DPO / IPO losses, the Bradley-Terry reward-model loss, and metrics (log-probabilities: logprobs.py).

Row layout used throughout: a step has B prompts with two completions each; tensors over
sequences hold the B chosen completions first, then the B rejected ones ([2B, ...]).

Metrics come back as (sum, count) pairs, not means, so that ranks holding different numbers of
valid pairs all-reduce into the right global mean; metric_means divides at the end.
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type="sigmoid",
             valid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): the online DPO loss summed over the valid pairs, and their number, from
    per-sequence log-prob sums [B]. The loss is their quotient; the trainer divides only once it
    knows the count over all micro-batches and ranks.

    valid [B] (bool) drops pairs the judge left undecided; with no valid pair the sum is a zero
    that still backpropagates (zero gradients), so every rank runs the same backward.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    # logits = (log pi(c) - log pi(r)) - (log pi_ref(c) - log pi_ref(r))
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)  # DPO: -log sigma(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2  # IPO: (logits - 1 / (2 beta))^2
    if valid is None:
        valid = torch.ones_like(losses, dtype=torch.bool)
    return torch.where(valid, losses, 0.0).sum(), valid.sum().to(losses.dtype)


def bradley_terry_loss(chosen_scores, rejected_scores):
    """(loss, accuracy, margin) of a reward model on pairs [B]; loss = mean -log sigma(r_c - r_r)."""
    margin = chosen_scores - rejected_scores
    loss = -F.logsigmoid(margin).mean()
    return loss, (margin > 0).float().mean().detach(), margin.mean().detach()


def online_dpo_metrics(logps, ref_logps, completion_mask, contain_eos, beta: float, valid=None, scores=None):
    """The reference's logged metrics as {name: (sum, count)} of 0-dim fp32 tensors.

    logps, ref_logps [2B, C]: token log-probs under the policy and the reference (no grad needed);
    completion_mask [2B, C]: 1 on completion tokens; contain_eos [2B] (bool); valid [B] (bool);
    scores [2B]: reward-model scores (missing-EOS penalty included), when there is a reward model.
    objective/* and val/* average over all 2B completions; rewards/* and logps/* over valid pairs.
    """
    logps, ref_logps = logps.detach().float(), ref_logps.detach().float()
    mask = completion_mask.float()
    B = len(logps) // 2
    valid = torch.ones(B, dtype=torch.bool, device=logps.device) if valid is None else valid
    n_valid = valid.sum().float()

    def over_sequences(x):  # x [2B]
        return x.sum(), torch.tensor(float(len(x)), device=x.device)

    def over_pairs(x):  # x [B]
        return torch.where(valid, x, 0.0).sum(), n_valid

    # Unlike TRL, every per-sequence sum here runs over completion tokens only: TRL's KL and
    # entropy also add up the log-probs at padding positions after EOS.
    seq_logps = (logps * mask).sum(1)
    kl = ((logps - ref_logps) * mask).sum(1)  # sum_t log pi - log pi_ref, the k1 estimate of KL
    # TRL's sign, not its docs': non_score_reward = -beta * KL, so rlhf_reward = scores + non_score_reward.
    non_score_reward = -beta * kl
    # reward of the implicit reward model: beta * (log pi(y) - log pi_ref(y))
    rewards = beta * (seq_logps - (ref_logps * mask).sum(1))
    chosen, rejected = rewards[:B], rewards[B:]

    metrics = {
        "objective/kl": over_sequences(kl),
        "objective/entropy": over_sequences(-seq_logps),  # -sum log pi of the sampled tokens
        "objective/non_score_reward": over_sequences(non_score_reward),
    }
    if scores is not None:
        scores = scores.detach().float()
        metrics["objective/rlhf_reward"] = over_sequences(scores + non_score_reward)
        metrics["objective/scores"] = over_sequences(scores)
        metrics["objective/scores_margin"] = over_pairs(scores[:B] - scores[B:])
    metrics |= {
        "rewards/chosen": over_pairs(chosen),
        "rewards/rejected": over_pairs(rejected),
        "rewards/margins": over_pairs(chosen - rejected),
        "rewards/accuracies": over_pairs((chosen > rejected).float()),
        "logps/chosen": over_pairs(seq_logps[:B]),
        "logps/rejected": over_pairs(seq_logps[B:]),
        "val/contain_eos_token": over_sequences(contain_eos.float()),
        # float64, so that the log reads beta 0.1 and not fp32's 0.10000000149011612
        "beta": (torch.tensor(beta, dtype=torch.float64, device=logps.device), torch.tensor(1.0, device=logps.device)),
    }
    return metrics


def add_metrics(total: dict, metrics: dict) -> dict:
    """Add {name: (sum, count)} into `total` in place (over micro-batches, steps), and return it."""
    for name, (s, c) in metrics.items():
        prev_s, prev_c = total.get(name, (0.0, 0.0))
        total[name] = (prev_s + s, prev_c + c)
    return total


def metric_means(metrics) -> dict[str, float]:
    """{name: sum / count} as floats, after any cross-rank sum; metrics with count 0 are left out."""
    return {name: (s / c).item() for name, (s, c) in metrics.items() if c > 0}
