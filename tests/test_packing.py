"""Packed pairs (packing.py): a prompt once with both completions gives each completion exactly
the log-probs and gradients it gets in a row of its own, checked against transformers' logits."""

import pytest
import torch
import torch.nn.functional as F

from minidpo.packing import pack, pack_shared_prefixes
from model_helpers import CAUSAL, TOL, build, hf_positions, random_ids


def test_layout_by_hand():
    # One prompt of 2 real tokens after 1 pad, completions of 2 tokens: columns p p p c c r r.
    pairs = pack(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[[7, 8], [9, 2]]]))
    assert pairs.input_ids.tolist() == [[0, 5, 6, 7, 8, 9, 2]]
    assert pairs.positions.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    assert pairs.predicting.tolist() == [2, 3, 2, 5]  # the prompt's last column predicts both first tokens
    assert pairs.targets.tolist() == [[7, 8, 9, 2]]
    sees = [[1, 0, 0, 0, 0, 0, 0],  # the pad sees only itself
            [0, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 1, 1, 0, 0, 1, 0],  # the rejected completion skips the chosen one
            [0, 1, 1, 0, 0, 1, 1]]
    assert pairs.block_mask.int().tolist() == [sees]


def test_shared_prefixes_by_hand():
    rows = [torch.tensor(r) for r in ([1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [6, 7], [6, 7, 8], [9])]
    packed, last = pack_shared_prefixes(rows, 3)
    # Group 1 shares [1, 2]; its third row repeats the first. Group 2 shares nothing: its shortest
    # row's one token must stay in its rest. Rests are 3 columns wide ([6, 7, 8]).
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 0, 5, 0, 0, 0, 0, 0],
                                         [0, 0, 6, 7, 0, 6, 7, 8, 9, 0, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4],
                                         [0, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert last.tolist() == [[3, 5, 3], [3, 7, 8]]
    alone, last_alone = pack_shared_prefixes(rows[:2], 1)  # k = 1: every row on its own
    assert alone.input_ids.tolist() == [[1, 2, 3, 4], [0, 1, 2, 5]] and last_alone.tolist() == [[3], [3]]


def rows_and_pairs():
    """Three left-padded prompts and two right-padded completions each (shorter ones padded after EOS)."""
    prompt_lengths, P, C = [7, 4, 2], 7, 5
    prompts = random_ids(3, P, seed=3)
    prompt_mask = torch.zeros_like(prompts)
    for row, n in enumerate(prompt_lengths):
        prompt_mask[row, P - n:] = 1
    chosen, rejected = random_ids(3, C, seed=4), random_ids(3, C, seed=5)
    chosen_mask, rejected_mask = torch.ones_like(chosen), torch.ones_like(rejected)
    chosen_mask[1, 3:] = 0
    rejected_mask[2, 1:] = 0
    chosen[chosen_mask == 0] = rejected[rejected_mask == 0] = 0  # the pad id
    return prompts, prompt_mask, (chosen, chosen_mask), (rejected, rejected_mask)


def rowwise_logprobs(logits_fn, prompts, prompt_mask, completion, completion_mask):
    """log p(completion tokens) [B, C] from one row per completion, the usual layout."""
    C = completion.shape[1]
    ids, mask = torch.cat([prompts, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    logits = logits_fn(ids, mask)[:, -C - 1 : -1]
    return F.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied", "neox_parallel"])
def test_packed_logprobs_match_transformers_rows(tmp_path, name):
    config, cls = CAUSAL[name]()
    ref, model = build(tmp_path, config, cls)
    prompts, prompt_mask, (chosen, chosen_mask), (rejected, rejected_mask) = rows_and_pairs()
    pairs = pack(prompts, prompt_mask, torch.stack([chosen, rejected], 1))
    with torch.no_grad():
        packed = model(pairs.input_ids, positions=pairs.positions, block_mask=pairs.block_mask,
                       logits_to_keep=pairs.predicting, targets=pairs.targets)

        def theirs(ids, mask):
            return ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits

        C = chosen.shape[1]
        for part, (completion, mask) in enumerate([(chosen, chosen_mask), (rejected, rejected_mask)]):
            want = rowwise_logprobs(theirs, prompts, prompt_mask, completion, mask)
            got = packed[:, part * C : (part + 1) * C]
            assert (got - want)[mask.bool()].abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["qwen2_tied", "neox_parallel"])
def test_packed_gradients_match_one_row_per_completion(tmp_path, name):
    config, cls = CAUSAL[name]()
    _, model = build(tmp_path, config, cls)
    prompts, prompt_mask, (chosen, chosen_mask), (rejected, rejected_mask) = rows_and_pairs()
    upstream = torch.randn(3, 2 * chosen.shape[1], generator=torch.Generator().manual_seed(6))
    upstream *= torch.cat([chosen_mask, rejected_mask], 1)  # padding after EOS carries no loss

    pairs = pack(prompts, prompt_mask, torch.stack([chosen, rejected], 1))
    packed = model(pairs.input_ids, positions=pairs.positions, block_mask=pairs.block_mask,
                   logits_to_keep=pairs.predicting, targets=pairs.targets)
    packed_grads = torch.autograd.grad((packed * upstream).sum(), list(model.parameters()))

    rows = torch.cat([rowwise_logprobs(model, prompts, prompt_mask, chosen, chosen_mask),
                      rowwise_logprobs(model, prompts, prompt_mask, rejected, rejected_mask)], 1)
    row_grads = torch.autograd.grad((rows * upstream).sum(), list(model.parameters()))
    for (param_name, _), got, want in zip(model.named_parameters(), packed_grads, row_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=param_name)
