"""Scoring a prompt's completions in one row: the prompt once, then each completion.

Online DPO scores each completion under the policy (with gradients), the reference and a reward model. One row per
completion would compute every prompt token once per completion in each of those passes; prompts are often longer
than completions, so a third or more of the work would be repeated. Instead each row is
[prompt | completion 1 | ... | completion k] and the attention mask keeps the completions from seeing each other, so
that each completion sees exactly what it would see in a row of its own (k = 2: the chosen and the rejected completion):

    query \\ key   prompt   chosen   rejected
    prompt        causal     -         -
    chosen        all      causal      -
    rejected      all        -       causal

Every completion's positions restart where the prompt ends, as in a row of its own. The prompt's
last position predicts the first token of every completion."""

from dataclasses import dataclass
import os

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [B, P + kC]
    positions: torch.Tensor  # [B, P + kC] rotary positions
    block_mask: torch.Tensor  # [B, P + kC, P + kC] bool: which keys (last axis) each query sees
    predicting: torch.Tensor  # [kC] the columns whose logits predict `targets`, the same in every row
    targets: torch.Tensor  # [B, kC] the first completion's tokens, then the second one's, ...


def pack(prompt_ids, prompt_mask, completions) -> Packed:
    """Rows [prompt | completion 1 | ... | completion k] from left-padded prompts [B, P] and right-padded completions
    [B, k, C] (padding after EOS is never attended to by a real token: it comes last)."""
    B, P = prompt_ids.shape
    k, C = completions.shape[1:]
    device = prompt_ids.device
    steps = torch.arange(C, device=device)
    completion_positions = (prompt_mask.sum(1, keepdim=True) + steps).repeat(1, k)  # [B, kC]: after each prompt
    positions = torch.cat([(prompt_mask.cumsum(1) - 1).clamp(min=0), completion_positions], 1)

    # segment: 0 prompt, j the j-th completion. A query sees earlier keys of its own segment and
    # the prompt's real tokens; a padding query sees only itself, so no softmax row is empty.
    segment = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, k + 1).repeat_interleave(C)]).to(device)
    column = torch.arange(P + k * C, device=device)
    causal = column[None, :] <= column[:, None]
    same_or_prompt = (segment[None, :] == segment[:, None]) | (segment[None, :] == 0)
    key_real = torch.cat([prompt_mask.bool(), torch.ones(B, k * C, dtype=torch.bool, device=device)], 1)
    mask = (causal & same_or_prompt)[None] & key_real[:, None, :]
    mask |= torch.eye(P + k * C, dtype=torch.bool, device=device)

    # The token at column j is predicted by column j - 1; a completion's first token by the prompt's last.
    predicting = P - 1 + torch.arange(k * C, device=device)
    predicting[C::C] = P - 1  # the first column of completions 2..k
    return Packed(torch.cat([prompt_ids, completions.flatten(1)], 1), positions, mask, predicting,
                  completions.flatten(1))


def pack_shared_prefixes(rows: list, k: int) -> tuple[Packed, torch.Tensor]:
    """Token rows (1-d tensors, no padding) in consecutive groups of k, one packed row per group:
    [the group's longest common prefix | each row's rest], every rest keeping at least its last
    token. For a reward model, which reads each text at its last token: returns the packed rows and
    that token's column [groups, k]. A repeated row is read at its first copy's column."""
    groups = [rows[i:i + k] for i in range(0, len(rows), k)]
    # os.path.commonprefix compares any sequences element by element, token lists included.
    shared = [min(len(os.path.commonprefix([r.tolist() for r in group])), min(map(len, group)) - 1) for group in groups]
    P, C = max(shared), max(len(r) - p for group, p in zip(groups, shared) for r in group)
    prefix, prefix_mask = torch.zeros(len(groups), P, dtype=torch.long), torch.zeros(len(groups), P, dtype=torch.long)
    rests, last = torch.zeros(len(groups), k, C, dtype=torch.long), torch.zeros(len(groups), k, dtype=torch.long)
    for g, (group, p) in enumerate(zip(groups, shared)):
        prefix[g, P - p:], prefix_mask[g, P - p:] = group[0][:p], 1  # left-padded, as pack() expects
        for j, row in enumerate(group):
            twin = next((i for i in range(j) if torch.equal(group[i], row)), None)
            if twin is not None:  # a repeated text is read where it was first (the same score, not one
                last[g, j] = last[g, twin]  # rounded differently in another column); its rest stays padding
                continue
            rests[g, j, :len(row) - p] = row[p:]
            last[g, j] = P + j * C + len(row) - p - 1
    return pack(prefix, prefix_mask, rests), last
