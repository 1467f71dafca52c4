"""logprobs.token_logprobs against log_softmax of the full logits, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from minidpo.logprobs import token_logprobs


def full_logits_reference(hidden, weight, targets, cap=None):
    logits = F.linear(hidden, weight)
    if cap:  # Gemma 2's soft-cap, as transformers writes it
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("cap", [None, 2.0])  # logits of std ~3: a cap of 2 bends most of them
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 15])  # 15 rows: 15 chunks, 4 + 4 + 4 + 3, one chunk
def test_token_logprobs_match_log_softmax_of_the_logits(rows_per_chunk, cap):
    torch.manual_seed(0)
    B, K, H, V = 3, 5, 8, 11
    hidden = torch.randn(B, K, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(V, (B, K))
    upstream = torch.randn(B, K)

    got = token_logprobs(hidden, weight, targets, chunk_bytes=rows_per_chunk * V * 4, cap=cap)
    (got * upstream).sum().backward()
    got_grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    want = full_logits_reference(hidden, weight, targets, cap)
    if cap:  # the cap changes the answer: a test of the cap, not of the plain path again
        assert (want - full_logits_reference(hidden, weight, targets)).abs().max() > 0.5
    (want * upstream).sum().backward()

    assert got.shape == (B, K) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_backward_projects_in_bf16_like_forward():
    # Both sides project in bf16 under autocast; the fused backward must too, or its softmax would
    # not match the logsumexp saved in forward and the gradients would drift from autograd's.
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(50, (4, 6))
    with torch.autocast("cpu", torch.bfloat16):
        got = token_logprobs(hidden, weight, targets, chunk_bytes=7 * 50 * 4)
        want = full_logits_reference(hidden, weight, targets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got_grads = torch.autograd.grad(got.sum(), (hidden, weight))
    want_grads = torch.autograd.grad(want.sum(), (hidden, weight))
    assert got_grads[1].dtype == torch.float32
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)  # both bf16 products, summed in other orders


def test_a_hand_computed_value_without_grad():
    # logits [0, log 3]: p(token 1) = 3/4.
    hidden, weight = torch.tensor([[1.0]]), torch.tensor([[0.0], [math.log(3.0)]])
    with torch.no_grad():
        got = token_logprobs(hidden, weight, torch.tensor([1]))
    assert got.item() == pytest.approx(math.log(3 / 4))
