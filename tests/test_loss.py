import math

import pytest
import torch

from minidpo import loss
from minidpo.loss import bradley_terry_loss, dpo_loss
from minidpo.tracking import Metrics


def as_pairs(x):
    """[2B, ...] (the B chosen rows, then the B rejected ones) -> the rollout's [B, 2, ...]."""
    return x.view(2, len(x) // 2, *x.shape[1:]).transpose(0, 1)


def online_dpo_metrics(logps, ref_logps, mask, contain_eos, beta, valid=None, scores=None):
    """loss.online_dpo_metrics on token log-probs [2B, C] and a mask, summed here per completion."""
    return loss.online_dpo_metrics(as_pairs((logps * mask).sum(1)), as_pairs((ref_logps * mask).sum(1)),
                                   as_pairs(contain_eos), beta, valid, None if scores is None else as_pairs(scores))


def metric_means(metrics: dict) -> dict:
    total = Metrics()
    total.add(metrics)
    return total.means()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Two pairs: per-sequence log-prob sums of the policy and the reference.
PC, PR, RC, RR = [-1.0, -4.0], [-2.0, -1.0], [-1.5, -3.0], [-1.0, -2.0]
# logits = (pc - pr) - (rc - rr): pair 0 -> 1 - (-0.5) = 1.5; pair 1 -> -3 - (-1) = -2
LOGITS = [1.5, -2.0]


def pairs(requires_grad=False):
    return [torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad) for x in (PC, PR, RC, RR)]


def values(loss_sum_and_count):
    return [x.item() for x in loss_sum_and_count]


def test_dpo_sigmoid_hand_values():
    beta = 0.1
    per_pair = [-math.log(sigmoid(beta * z)) for z in LOGITS]
    assert values(dpo_loss(*pairs(), beta)) == pytest.approx([sum(per_pair), 2])
    second_only = torch.tensor([False, True])
    assert values(dpo_loss(*pairs(), beta, "sigmoid", valid=second_only)) == pytest.approx([per_pair[1], 1])


def test_ipo_hand_values():
    beta = 0.25  # 1 / (2 beta) = 2
    per_pair = [(1.5 - 2) ** 2, (-2.0 - 2) ** 2]  # 0.25, 16
    assert values(dpo_loss(*pairs(), beta, "ipo")) == pytest.approx([16.25, 2])
    assert values(dpo_loss(*pairs(), beta, "ipo", valid=torch.tensor([True, False]))) == pytest.approx([per_pair[0], 1])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_no_valid_pair_gives_zero_loss_with_zero_grad(loss_type):
    pc, pr, rc, rr = pairs(requires_grad=True)
    loss, count = dpo_loss(pc, pr, rc, rr, 0.1, loss_type, valid=torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert torch.equal(pc.grad, torch.zeros(2, dtype=torch.float64))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, simpo.*'kto'"):
        dpo_loss(*pairs(), 0.1, "kto")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_gradcheck(loss_type):
    pc, pr, rc, rr = pairs(requires_grad=True)
    valid = torch.tensor([True, False])
    assert torch.autograd.gradcheck(lambda c, r: dpo_loss(c, r, rc.detach(), rr.detach(), 0.3, loss_type)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda c, r: dpo_loss(c, r, rc.detach(), rr.detach(), 0.3, loss_type, valid)[0],
                                    (pc, pr))


def test_bradley_terry_hand_values():
    loss, accuracy, margin = bradley_terry_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0]))
    # margins 1, -0.5, 0
    want = -(math.log(sigmoid(1.0)) + math.log(sigmoid(-0.5)) + math.log(0.5)) / 3
    assert loss.item() == pytest.approx(want)
    assert accuracy.item() == pytest.approx(1 / 3)
    assert margin.item() == pytest.approx(0.5 / 3)


# B = 2 pairs: rows 0, 1 chosen, rows 2, 3 rejected; C = 3 with padding after the completion.
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -9.0, -9.0], [-0.5, -0.5, -7.0], [-2.0, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -1.0, -1.0], [0.0, 0.0, -1.0], [-1.0, -1.0, -1.0]])
EOS = torch.tensor([True, True, False, True])
SCORES = torch.tensor([2.0, 1.0, 0.5, 1.5])


def test_metrics_hand_values_ignore_padding():
    beta = 0.5
    # masked sums per sequence          policy   reference   kl = policy - reference
    #   row 0: -1 - 2 - 0.5             -3.5     -3.5         0
    #   row 1: -3 (padding: -9, -9)     -3       -2          -1
    #   row 2: -0.5 - 0.5 (padding: -7) -1        0          -1
    #   row 3: -2 - 1 - 1               -4       -3          -1
    # non_score_reward -beta * kl: [0, 0.5, 0.5, 0.5]
    # implicit rewards beta * kl: chosen [0, -0.5], rejected [-0.5, -0.5]; margins [0.5, 0]
    means = metric_means(online_dpo_metrics(LOGPS, REF, MASK, EOS, beta, scores=SCORES))
    want = {
        "objective/kl": -0.75,  # with padding, row 1 would add -16 and row 2 -6
        "objective/entropy": (3.5 + 3 + 1 + 4) / 4,  # with padding, rows 1 and 2 would add 18 and 7
        "objective/non_score_reward": 0.375,
        "objective/rlhf_reward": (2 + 1.5 + 1 + 2) / 4,  # scores + non_score_reward
        "objective/scores": 5 / 4,
        "objective/scores_margin": ((2 - 0.5) + (1 - 1.5)) / 2,
        "rewards/chosen": -0.25,
        "rewards/rejected": -0.5,
        "rewards/margins": 0.25,
        "rewards/accuracies": 0.5,  # a margin of exactly 0 is not a win
        "logps/chosen": (-3.5 - 3) / 2,
        "logps/rejected": (-1 - 4) / 2,
        "val/contain_eos_token": 0.75,
        "beta": 0.5,
    }
    assert means.keys() == want.keys()
    for name, value in want.items():
        assert means[name] == pytest.approx(value), name


def test_metrics_over_valid_pairs():
    means = metric_means(online_dpo_metrics(LOGPS, REF, MASK, EOS, 2.0, valid=torch.tensor([False, True])))
    assert "objective/scores" not in means and "objective/rlhf_reward" not in means  # no reward model
    assert means["objective/entropy"] == pytest.approx(11.5 / 4)  # all four completions, valid or not
    assert means["objective/non_score_reward"] == pytest.approx(-2.0 * -0.75)
    assert means["rewards/chosen"] == pytest.approx(2.0 * -1)  # pair 1 only
    assert means["rewards/rejected"] == pytest.approx(2.0 * -1)
    assert means["rewards/accuracies"] == 0.0
    assert means["logps/chosen"] == pytest.approx(-3.0)
    assert means["beta"] == 2.0
    with_scores = online_dpo_metrics(LOGPS, REF, MASK, EOS, 2.0, valid=torch.tensor([False, True]), scores=SCORES)
    assert metric_means(with_scores)["objective/scores_margin"] == pytest.approx(1 - 1.5)
    assert metric_means(with_scores)["objective/scores"] == pytest.approx(5 / 4)  # all four completions

    none_valid = metric_means(online_dpo_metrics(LOGPS, REF, MASK, EOS, 2.0, valid=torch.tensor([False, False])))
    assert "rewards/chosen" not in none_valid and "logps/rejected" not in none_valid
    assert none_valid["objective/kl"] == pytest.approx(-0.75)


def test_metrics_reduce_across_ranks():
    torch.manual_seed(0)
    beta = 0.1
    rank_sizes, rank_valid = [3, 1], [torch.tensor([True, False, True]), torch.tensor([True])]
    ranks = []
    for B, valid in zip(rank_sizes, rank_valid):
        mask = (torch.rand(2 * B, 4) < 0.7).long()
        ranks.append((-torch.rand(2 * B, 4) * 3, -torch.rand(2 * B, 4) * 3, mask, torch.rand(2 * B) < 0.5, valid,
                      torch.randn(2 * B)))
    per_rank = [online_dpo_metrics(lp, ref, m, eos, beta, valid=v, scores=s) for lp, ref, m, eos, v, s in ranks]
    summed = {name: (sum(r[name][0] for r in per_rank), sum(r[name][1] for r in per_rank)) for name in per_rank[0]}

    def chosen_then_rejected(i):  # concatenate the ranks' chosen rows, then their rejected rows
        parts = [r[i] for r in ranks]
        return torch.cat([p[: len(p) // 2] for p in parts] + [p[len(p) // 2 :] for p in parts])

    lp, ref, m, eos, s = (chosen_then_rejected(i) for i in (0, 1, 2, 3, 5))
    whole = metric_means(online_dpo_metrics(lp, ref, m, eos, beta, valid=torch.cat(rank_valid), scores=s))
    reduced = metric_means(summed)
    assert reduced.keys() == whole.keys()
    for name in whole:
        assert reduced[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
    # a mean of per-rank means would be wrong here: rank 0 has 2 valid pairs, rank 1 has 1
    naive = sum(metric_means(r)["logps/chosen"] for r in per_rank) / 2
    assert naive != pytest.approx(whole["logps/chosen"])


# ---------------------------------------------------------------------------------------------
# Beyond TRL's online losses: hinge (SLiC), label smoothing (conservative DPO), SimPO, the RPO term.


@pytest.mark.parametrize("loss_type, smoothing, per_pair", [
    # logits h: pair 0 -> 1.5, pair 1 -> -2 (above); beta 0.5
    ("hinge", 0.0, [max(0, 1 - 0.5 * 1.5), max(0, 1 - 0.5 * -2.0)]),
    ("sigmoid", 0.2, [-0.8 * math.log(sigmoid(0.75)) - 0.2 * math.log(sigmoid(-0.75)),
                      -0.8 * math.log(sigmoid(-1.0)) - 0.2 * math.log(sigmoid(1.0))]),
])
def test_reference_losses_hand_values(loss_type, smoothing, per_pair):
    loss, count = dpo_loss(*pairs(), 0.5, loss_type, label_smoothing=smoothing)
    assert (loss.item(), count.item()) == pytest.approx((sum(per_pair), 2))


def test_simpo_hand_values():
    # means: chosen [-1, -4], rejected [-2, -1]; beta 2, gamma 0.5: beta*(c - r) - gamma = [1.5, -6.5]
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -1.0])
    loss, count = dpo_loss(chosen, rejected, None, None, 2.0, "simpo", simpo_gamma=0.5)
    assert loss.item() == pytest.approx(-math.log(sigmoid(1.5)) - math.log(sigmoid(-6.5)))
    smoothed, _ = dpo_loss(chosen, rejected, None, None, 2.0, "simpo", label_smoothing=0.1, simpo_gamma=0.5)
    assert smoothed.item() == pytest.approx(sum(-0.9 * math.log(sigmoid(x)) - 0.1 * math.log(sigmoid(-x))
                                                for x in (1.5, -6.5)))


@pytest.mark.parametrize("loss_type, smoothing", [("hinge", 0.0), ("sigmoid", 0.2), ("simpo", 0.1)])
def test_new_losses_gradcheck(loss_type, smoothing):
    pc, pr, rc, rr = pairs(requires_grad=True)
    refs = (None, None) if loss_type == "simpo" else (rc.detach(), rr.detach())
    valid = torch.tensor([True, False])
    for v in (None, valid):
        assert torch.autograd.gradcheck(
            lambda c, r: dpo_loss(c, r, *refs, 0.3, loss_type, v, smoothing, 0.4)[0], (pc, pr))


def trl_loss(loss_types, loss_weights, beta, token_logps, completion_mask, ref_chosen, ref_rejected,
             label_smoothing=0.0):
    """TRL 1.16 DPOTrainer's own loss code (_compute_loss) on given token log-probs [2B, T]: a stand-in
    model returns them, the reference's sums are passed as precomputed, and the trainer's state is the
    little the loss code reads."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    rows, T = token_logps.shape
    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros(rows, T), mean_logits=torch.zeros(rows, T),
                              is_top1=torch.zeros(rows, T, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    identity = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=identity, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights, beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    # Completion tokens sit at columns 1.. of the inputs: the shifted mask [2B, T] is the given one.
    mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), completion_mask], 1)
    inputs = {"input_ids": torch.zeros(rows, T + 1, dtype=torch.long), "attention_mask": torch.ones(rows, T + 1),
              "completion_mask": mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


def test_hinge_smoothing_and_rpo_equal_trls_loss_code():
    torch.manual_seed(0)
    B, C, beta = 3, 5, 0.3
    mask = torch.ones(2 * B, C, dtype=torch.long)
    mask[B:, 3:] = 0  # rejected completions shorter; the chosen ones all of length C (see the NLL note)
    token_logps = -torch.rand(2 * B, C) * 3 * mask
    ref = (-torch.rand(2 * B, C) * 3 * mask).sum(1)
    seq = token_logps.sum(1)
    ours = lambda loss_type, smoothing=0.0: dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta, loss_type,
                                                     label_smoothing=smoothing)[0] / B
    theirs = lambda types, weights, smoothing=0.0: trl_loss(types, weights, beta, token_logps, mask, ref[:B], ref[B:],
                                                            smoothing)
    assert ours("hinge").item() == pytest.approx(theirs(["hinge"], [1.0]).item(), rel=1e-6)
    assert ours("sigmoid").item() == pytest.approx(theirs(["sigmoid"], [1.0]).item(), rel=1e-6)
    # TRL 1.16's sigmoid has no label smoothing; its "aot" loss applies it to sorted log-ratio
    # differences, which for one pair are the DPO logits themselves.
    one = lambda x: x[[0, B]]
    for smoothing in (0.1, 0.3):
        mine = dpo_loss(seq[:1], seq[B:B + 1], ref[:1], ref[B:B + 1], beta, "sigmoid", label_smoothing=smoothing)[0]
        assert mine.item() == pytest.approx(trl_loss(["aot"], [1.0], beta, one(token_logps), one(mask), ref[:1],
                                                     ref[B:B + 1], smoothing).item(), rel=1e-6)
    # rpo_alpha is TRL 1.16's "sft" term weighted by alpha: the chosen tokens' mean NLL over the batch.
    # minidpo normalises per completion, as the RPO paper does; equal when the chosen lengths are equal.
    alpha = 0.7
    nll = (-seq[:B] / mask[:B].sum(1)).mean()
    assert (ours("sigmoid") + alpha * nll).item() == pytest.approx(
        theirs(["sigmoid", "sft"], [1.0, alpha]).item(), rel=1e-6)
