"""Two things that make minidpo fast on CPU, each measured in bench/RESULTS.md.

1. fp32 linear layers through oneDNN. PyTorch's CPU build hands fp32 matmuls to MKL's sgemm,
   which on AMD CPUs runs kernels far below the machine's peak; oneDNN, which PyTorch already
   uses for bf16, generates kernels for the CPU it runs on. On the 2-core AMD EPYC of the results
   the fp32 products of SmolLM2's layers ran 2-2.7x faster through it, forward and both backward
   products alike, at fp32 accuracy. linear() is F.linear with that one difference; everything
   else (CUDA, bf16, autocast, float64) goes to F.linear unchanged.

2. Freed memory kept for reuse (keep_freed_memory). glibc serves every allocation over 32 MiB
   with a fresh mmap and unmaps it on free, so each training step's large tensors (a chunk of
   logits and its softmax, the output embedding's gradient) arrive as new pages that the kernel
   must zero-fill on first touch, page by page.
"""

import ctypes
import platform

import torch
import torch.nn.functional as F

_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _mm(x, weight, bias=None):
    """x [..., in] @ weight [out, in]^T (+ bias) in one oneDNN call; either may be a strided view."""
    return _onednn_linear(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """oneDNN's linear op has no backward; the two backward products are oneDNN linears too,
    on transposed views:  y = x W^T + b,  dL/dx = g W,  dL/dW = g^T x,  dL/db = sum of g over rows."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t())  # [..., out] @ [out, in]
        rows_grad, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = _mm(rows_grad.t(), rows_x.t())  # [out, rows] @ [rows, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the oneDNN path: fp32 on CPU, outside autocast."""
    return (_onednn_linear is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through oneDNN for fp32 on CPU."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _Linear.apply(x, weight, bias) if needs_grad else _mm(x, weight, bias)


# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the next allocation; False if not glibc.

    With mmap off every block comes from the heap, and with the trim threshold at its maximum
    the heap is never shrunk, so a step's large tensors land on pages the previous step already
    touched. The cost is memory the process never returns to the system before it exits; its
    peak is nearly the same (bench/RESULTS.md). Call it once, before the tensors it should cover.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
