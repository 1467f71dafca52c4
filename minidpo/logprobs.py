"""Log-probabilities of given tokens straight from the last hidden states, a few rows at a time.

DPO needs only log p(target) at each completion position, one number per token, but the usual route goes through the
full logits [rows, vocab] in fp32, their gradient of the same size, and a softmax of the same size again in backward:
with SmolLM2's 49152-token vocabulary that is 200 KB per token, several times what all 30 layers keep for it. Here the
output projection and the log-softmax are one step, done a chunk of rows at a time in forward and again in backward:

    logits = h W^T          log p(t) = logits[t] - logsumexp(logits)
    dL/dlogits = g (onehot(t) - softmax(logits))
    dL/dh = dL/dlogits W    dL/dW = dL/dlogits^T h

Gemma 2 soft-caps the logits, z -> c tanh(z / c): the log-softmax then reads the capped logits
and dL/dz = dL/dcapped (1 - (capped / c)^2).

Only h, the logsumexp per row and the targets are kept for backward; backward projects each chunk
again (the head's forward product, about a fifth of a small model's FLOPs per token, done twice)."""

import torch

from .cpu import linear


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, cap):
        # hidden [N, hidden] is flat, targets has any shape of N elements. The result has targets'
        # shape and is a tensor of its own: FSDP warns when a module returns a view.
        flat_targets = targets.reshape(-1)
        lse = torch.empty(flat_targets.shape, dtype=torch.float32, device=hidden.device)
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        flat_out = out.view(-1)
        for i in range(0, len(hidden), rows):
            logits = softcap(linear(hidden[i : i + rows], weight), cap).float()
            lse[i : i + rows] = logits.logsumexp(-1)
            flat_out[i : i + rows] = logits.gather(-1, flat_targets[i : i + rows, None])[:, 0] - lse[i : i + rows]
        ctx.save_for_backward(hidden, weight, flat_targets, lse)
        ctx.rows, ctx.cap = rows, cap
        # Backward must project in the dtype forward did (e.g. bf16 under autocast), or its softmax
        # would not match the saved logsumexp. Autograd runs backward outside autocast: re-enter it.
        device = hidden.device.type
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                            enabled=torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad = grad.reshape(-1)
        grad_hidden, grad_weight = torch.empty_like(hidden), None
        with torch.autocast(**ctx.autocast):
            for i in range(0, len(hidden), ctx.rows):
                h, g = hidden[i : i + ctx.rows], grad[i : i + ctx.rows, None]
                # In place, one [rows, vocab] fp32 buffer: softmax, times -g, plus g at the target.
                logits = softcap(linear(h, weight), ctx.cap).float()
                through_tanh = 1 - (logits / ctx.cap).square() if ctx.cap else None  # d capped / d z
                grad_logits = logits.sub_(lse[i : i + ctx.rows, None]).exp_().mul_(-g)
                grad_logits.scatter_add_(-1, targets[i : i + ctx.rows, None], g)
                if through_tanh is not None:
                    grad_logits.mul_(through_tanh)
                grad_logits = grad_logits.to(h.dtype)
                grad_hidden[i : i + ctx.rows] = linear(grad_logits, weight.t())
                if ctx.needs_input_grad[1]:
                    part = linear(grad_logits.t(), h.t()).to(weight.dtype)  # [vocab, hidden]
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
        return grad_hidden, grad_weight, None, None, None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) in the logits' dtype, as transformers computes it; None: unchanged."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_bytes: int = 256 * 2**20, cap: float | None = None) -> torch.Tensor:
    """log p(targets) [...] in fp32 from final hidden states [..., hidden] (after the last norm), the output embedding
    `weight` [vocab, hidden] and targets [...] (valid token ids everywhere: the pad id at padding, masked afterwards).

    Rows go chunk_bytes of fp32 logits at a time (at least one row): beyond what it is given and returns, it holds one
    chunk's logits, and in backward also the weight's gradient. cap: Gemma 2's final-logit soft-cap (None: none)."""
    rows = max(1, chunk_bytes // (weight.shape[0] * 4))
    return _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, rows, cap)
