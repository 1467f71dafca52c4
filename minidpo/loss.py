"""The online DPO / IPO losses, the Bradley-Terry reward-model loss, and metrics (log-probabilities: logprobs.py).

A step has B prompts with two completions each; per-completion tensors are [B, 2], the chosen
completion in column 0 and the rejected one in column 1 (the trainer's Rollout layout).

Metrics come back as (sum, count) pairs, not means: tracking.Metrics says why."""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type="sigmoid",
             valid=None, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): a preference loss summed over the valid pairs, and their number. The loss is
    their quotient; the trainer divides only once it knows the count over all micro-batches and ranks.

    Inputs are per-sequence log-probs [B]: sums over each completion's tokens, except for simpo,
    which takes their means over the tokens and no reference (ref_chosen, ref_rejected None).
    With h = (log pi(c) - log pi(r)) - (log pi_ref(c) - log pi_ref(r)) and eps = label_smoothing:
      sigmoid  (DPO; with eps > 0 conservative DPO)  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      ipo      (h - 1 / (2 beta))^2
      hinge    (SLiC)                                max(0, 1 - beta h)
      simpo    as sigmoid, with h = mean log pi(c) - mean log pi(r) - gamma / beta: -log sigma(beta D - gamma)
    valid [B] (bool) drops pairs the judge left undecided; with no valid pair the sum is a zero
    that still backpropagates (zero gradients), so every rank runs the same backward."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    # simpo is reference-free and length-normalised; its gamma is a margin on beta * h.
    offset = simpo_gamma / beta if loss_type == "simpo" else ref_chosen - ref_rejected
    logits = policy_chosen - policy_rejected - offset
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # sigmoid, simpo
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    valid = torch.ones_like(losses, dtype=torch.bool) if valid is None else valid
    return torch.where(valid, losses, 0.0).sum(), valid.sum().to(losses.dtype)


def bradley_terry_loss(chosen_scores, rejected_scores):
    """(loss, accuracy, margin) of a reward model on pairs [B]; loss = mean -log sigma(r_c - r_r)."""
    margin = chosen_scores - rejected_scores
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach(), margin.mean().detach()


def online_dpo_metrics(logps, ref_logps, contain_eos, beta: float, valid=None, scores=None):
    """The reference's logged metrics as {name: (sum, count)} of 0-dim tensors.

    Pair layout, as the trainer's Rollout: row b is prompt b, column 0 its chosen completion, column 1 the rejected
    one, further columns (contain_eos and scores only) its other samples. logps, ref_logps [B, 2]: each completion's
    log-prob summed over its tokens, under the policy and the reference (no grad needed; ref_logps None without a
    reference: SimPO); contain_eos [B, n] (bool); valid [B] (bool); scores [B, n]: reward scores (missing-EOS penalty
    included), if any. objective/* and val/* average over completions (scores and EOS over all n samples, the others
    over the two scored); rewards/* and logps/* over valid pairs. Without a reference the metrics that need one (KL,
    non-score and RLHF reward, implicit rewards) are left out, not logged as 0."""
    seq_logps = logps.detach().float()
    B, device = len(seq_logps), seq_logps.device
    valid = torch.ones(B, dtype=torch.bool, device=device) if valid is None else valid
    n_valid = valid.sum().float()

    def over_sequences(x):  # x [B, n]
        return x.sum(), torch.tensor(float(x.numel()), device=device)

    def over_pairs(x):  # x [B]
        return torch.where(valid, x, 0.0).sum(), n_valid

    metrics = {
        "objective/entropy": over_sequences(-seq_logps),  # -sum log pi of the sampled tokens
        "logps/chosen": over_pairs(seq_logps[:, 0]),
        "logps/rejected": over_pairs(seq_logps[:, 1]),
        "val/contain_eos_token": over_sequences(contain_eos.float()),
        # float64, so that the log reads beta 0.1 and not fp32's 0.10000000149011612
        "beta": (torch.tensor(beta, dtype=torch.float64, device=device), torch.tensor(1.0, device=device))}
    if scores is not None:
        scores = scores.detach().float()
        metrics["objective/scores"] = over_sequences(scores)
        metrics["objective/scores_margin"] = over_pairs(scores[:, 0] - scores[:, 1])
    if ref_logps is None:
        return metrics
    # Unlike TRL's KL and entropy, which also add up log-probs at padding after EOS, sums cover completion tokens.
    kl = seq_logps - ref_logps.detach().float()  # sum_t log pi - log pi_ref, the k1 estimate of KL
    # TRL's sign, not its docs': non_score_reward = -beta * KL, so rlhf_reward = scores + non_score_reward.
    non_score_reward = -beta * kl
    # the implicit reward model's reward: beta * (log pi(y) - log pi_ref(y))
    chosen, rejected = beta * kl[:, 0], beta * kl[:, 1]
    metrics |= {
        "objective/kl": over_sequences(kl),
        "objective/non_score_reward": over_sequences(non_score_reward),
        "rewards/chosen": over_pairs(chosen),
        "rewards/rejected": over_pairs(rejected),
        "rewards/margins": over_pairs(chosen - rejected),
        "rewards/accuracies": over_pairs((chosen > rejected).float())}
    if scores is not None:
        metrics["objective/rlhf_reward"] = over_sequences(scores[:, :2] + non_score_reward)
    return metrics
