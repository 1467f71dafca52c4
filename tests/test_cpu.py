"""cpu.py: the oneDNN linear against float64 products, and the allocator setting."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minidpo import cpu


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_forward_and_backward_match_float64(bias):
    torch.manual_seed(0)
    # 3-d input with a transposed (strided) layout, as attention hands its output to the projection.
    x = torch.randn(2, 16, 7).transpose(1, 2).requires_grad_()
    weight = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    assert cpu.uses_onednn(x, weight)
    y = cpu.linear(x, weight, b)
    upstream = torch.randn(y.shape)
    got = torch.autograd.grad((y * upstream).sum(), [t for t in (x, weight, b) if t is not None])

    exact = [t.detach().double().requires_grad_() for t in (x, weight, b) if t is not None]
    y64 = F.linear(*exact)
    want = torch.autograd.grad((y64 * upstream.double()).sum(), exact)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)


def test_only_weights_or_only_inputs_need_grad():
    x, weight = torch.randn(5, 8), torch.randn(3, 8, requires_grad=True)
    (grad_weight,) = torch.autograd.grad(cpu.linear(x, weight).sum(), [weight])
    torch.testing.assert_close(grad_weight, torch.ones(5, 3).T @ x)
    x.requires_grad_(), weight.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(cpu.linear(x, weight).sum(), [x])
    torch.testing.assert_close(grad_x, torch.ones(5, 3) @ weight)


def test_everything_else_goes_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_mm", lambda *a: calls.append(a) or F.linear(*a))
    x, weight = torch.randn(2, 4), torch.randn(3, 4)
    cpu.linear(x.double(), weight.double())
    cpu.linear(x.bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", torch.bfloat16):
        assert cpu.linear(x, weight).dtype == torch.bfloat16
    assert calls == []
    cpu.linear(x, weight)
    assert len(calls) == 1


FAULTS_OF_LATER_STEPS = """
import resource, sys, torch
from minidpo.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(10):  # ten "steps", each with three large tensors alive at once, as logits and gradients are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(n).fill_(1) for n in (10 * 2**20, 13 * 2**20, 16 * 2**20)]  # 40, 52, 64 MiB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del blocks
print(sum(faults[-4:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_new_ones():
    # The three blocks are 39936 pages of 4 KiB, each faulted in when a block comes from the kernel
    # anew, as every block over 32 MiB does by default. Kept, the heap settles after a few steps
    # (measured: 4-5) and later steps reuse its pages.
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_OF_LATER_STEPS, mode], check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "keep")}
    assert faults["default"] > 4 * 39000 and faults["keep"] < 1000, faults
