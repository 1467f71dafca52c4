"""Scoring a prompt's two completions in one row: the prompt once, then both completions.

Online DPO scores each completion under the policy (with gradients) and under the reference. One
row per completion would compute every prompt token twice in each of those passes; prompts are
often longer than completions, so a third or more of the work would be repeated. Instead each row
is [prompt | chosen | rejected] and the attention mask keeps the completions from seeing each
other, so that each completion sees exactly what it would see in a row of its own:

    query \\ key   prompt   chosen   rejected
    prompt        causal     -         -
    chosen        all      causal      -
    rejected      all        -       causal

The rejected completion's positions restart where the prompt ends, as in a row of its own. The
prompt's last position predicts the first token of both completions."""

from dataclasses import dataclass

import torch


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # [B, P + 2C]
    positions: torch.Tensor  # [B, P + 2C] rotary positions
    block_mask: torch.Tensor  # [B, P + 2C, P + 2C] bool: which keys (last axis) each query sees
    predicting: torch.Tensor  # [2C] the columns whose logits predict `targets`, the same in every row
    targets: torch.Tensor  # [B, 2C] the chosen completion's tokens, then the rejected one's


def pack_pairs(prompt_ids, prompt_mask, chosen_ids, rejected_ids) -> PackedPairs:
    """Rows [prompt | chosen | rejected] from left-padded prompts [B, P] and right-padded
    completions [B, C] (padding after EOS is never attended to by a real token: it comes last)."""
    B, P = prompt_ids.shape
    C = chosen_ids.shape[1]
    device = prompt_ids.device
    steps = torch.arange(C, device=device)
    prompt_len = prompt_mask.sum(1, keepdim=True)
    completion_positions = prompt_len + steps  # [B, C]
    positions = torch.cat([(prompt_mask.cumsum(1) - 1).clamp(min=0), completion_positions, completion_positions], 1)

    # segment: 0 prompt, 1 chosen, 2 rejected. A query sees earlier keys of its own segment and
    # the prompt's real tokens; a padding query sees only itself, so no softmax row is empty.
    segment = torch.cat([torch.zeros(P), torch.ones(C), torch.full((C,), 2)]).to(device)
    column = torch.arange(P + 2 * C, device=device)
    causal = column[None, :] <= column[:, None]
    same_or_prompt = (segment[None, :] == segment[:, None]) | (segment[None, :] == 0)
    key_real = torch.cat([prompt_mask.bool(), torch.ones(B, 2 * C, dtype=torch.bool, device=device)], 1)
    mask = (causal & same_or_prompt)[None] & key_real[:, None, :]
    mask |= torch.eye(P + 2 * C, dtype=torch.bool, device=device)

    # The token at column j is predicted by column j - 1; a completion's first token by the prompt's last.
    predicting = torch.cat([P - 1 + steps, P + C - 1 + steps])
    predicting[C] = P - 1
    return PackedPairs(torch.cat([prompt_ids, chosen_ids, rejected_ids], 1), positions, mask, predicting,
                       torch.cat([chosen_ids, rejected_ids], 1))
