"""cpu.py: both matmul paths against float64 products, the choice between them with a fake
clock, and the allocator setting."""

import json
import platform
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minidpo import cpu


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """No shape class timed or chosen yet, in this process or on disk, and the default setting."""
    monkeypatch.setattr(cpu, "_chosen", {})
    monkeypatch.setenv("MINIDPO_CPU_CHOICES", str(tmp_path / "choices" / "cpu_matmul.json"))
    monkeypatch.delenv("MINIDPO_CPU_MATMUL", raising=False)


@pytest.mark.parametrize("path", ["onednn", "mkl"])
@pytest.mark.parametrize("bias", [False, True])
def test_each_path_matches_f_linear_in_float64_forward_and_backward(bias, path, monkeypatch):
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", path)
    taken = []
    monkeypatch.setitem(cpu.PATHS, path, lambda *a, f=cpu.PATHS[path]: taken.append(path) or f(*a))
    torch.manual_seed(0)
    # 3-d input with a transposed (strided) layout, as attention hands its output to the projection.
    x = torch.randn(2, 16, 7).transpose(1, 2).requires_grad_()
    weight = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    assert cpu.chooses_path(x, weight)
    y = cpu.linear(x, weight, b)
    upstream = torch.randn(y.shape)
    got = torch.autograd.grad((y * upstream).sum(), [t for t in (x, weight, b) if t is not None])
    assert taken == [path] * 3  # forward, dL/dx, dL/dW

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


class FakeClock:
    """A clock that only the fake paths move: each call of a path takes seconds(path, x, weight)."""

    def __init__(self, monkeypatch, seconds):
        self.now, self.calls = 0.0, []
        monkeypatch.setattr(cpu, "_clock", lambda: self.now)
        for path in list(cpu.PATHS):
            monkeypatch.setitem(cpu.PATHS, path, self.path(path, seconds))

    def path(self, name, seconds):
        def run(x, weight, bias=None):
            self.now += seconds(name, x, weight)
            self.calls.append(name)
            return F.linear(x, weight, bias)
        return run


def test_the_faster_path_is_timed_first_then_kept(fresh_choice, monkeypatch):
    clock = FakeClock(monkeypatch, lambda path, x, w: {"onednn": 2.0, "mkl": 1.0}[path])
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    for _ in range(5):
        torch.testing.assert_close(cpu.linear(x, weight), F.linear(x, weight))
    trials = clock.calls[: 2 * (cpu.SAMPLES + 1)]
    assert trials == ["onednn", "mkl"] * (cpu.SAMPLES + 1)  # taking turns, before the first real product
    assert clock.calls[len(trials):] == ["mkl"] * 5  # every real product on one path, the first included
    assert cpu.choices() == {cpu.shape_class(x, weight): "mkl"}


def test_the_warm_up_call_is_not_counted(fresh_choice, monkeypatch):
    # oneDNN's first call builds its kernel (slow); afterwards it is the faster path.
    first = []
    def seconds(path, x, w):
        warm_up = path not in first
        first.append(path)
        return {"onednn": 100.0 if warm_up else 1.0, "mkl": 2.0}[path]
    FakeClock(monkeypatch, seconds)
    cpu.linear(torch.randn(4, 8), torch.randn(3, 8))
    assert set(cpu.choices().values()) == {"onednn"}


def test_small_products_take_the_best_of_many_calls(fresh_choice, monkeypatch):
    # A 0.1 ms product on a busy machine: oneDNN's thread is descheduled for its first five calls
    # (1 ms each), MKL takes 0.2 ms. SAMPLES calls alone would pick MKL for the whole process.
    calls = {"onednn": 0}
    def seconds(path, x, w):
        if path == "mkl":
            return 2e-4
        calls["onednn"] += 1
        return 1e-3 if calls["onednn"] <= 5 else 1e-4
    clock = FakeClock(monkeypatch, seconds)
    cpu.linear(torch.randn(4, 8), torch.randn(3, 8))
    assert set(cpu.choices().values()) == {"onednn"}
    # Each path ran until it had spent MIN_SECONDS: MKL 0.2 ms a call, its warm-up not counted.
    assert clock.calls.count("mkl") == round(cpu.MIN_SECONDS / 2e-4) + 1


def test_each_trial_reads_its_weight_from_memory_not_from_cache(fresh_choice, monkeypatch):
    # MKL is fast only on the weight it multiplied last (still in cache), oneDNN the same either way.
    # In a model the rest of the model passes between two products with a weight: oneDNN is faster.
    last = {}
    def seconds(path, x, w):
        hot, last[path] = last.get(path) is w, w
        return {"onednn": 2.0, "mkl": 1.0 if hot else 3.0}[path]
    monkeypatch.setattr(cpu, "CACHE_BYTES", 4 * 3 * 8 * 4)  # four of the weights fill the cache
    FakeClock(monkeypatch, seconds)
    cpu.linear(torch.randn(4, 8), torch.randn(3, 8))
    assert set(cpu.choices().values()) == {"onednn"}


def test_cold_copies_overflow_the_cache_and_keep_the_layout(monkeypatch, tmp_path):
    for index, size in enumerate(["48K", "1024K", "1M"]):  # sysfs: L1, L2, L3 (here 1 MiB)
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(cpu.glob, "glob", lambda pattern: [str(p) for p in tmp_path.glob("index*/size")])
    assert cpu.largest_cache_bytes() == 2**20
    monkeypatch.setattr(cpu, "CACHE_BYTES", 1000)
    weight = torch.randn(10, 8).t()  # 320 bytes, a transposed view (a backward product's operand)
    copies = cpu.cold_copies(weight, reordered=False)
    assert len(copies) == 5  # 1,600 bytes: more than the cache holds
    assert all(c.stride() == weight.stride() and torch.equal(c, weight) and c is not weight for c in copies)
    big = torch.randn(100, 8)  # alone more than the cache: itself, no copy
    assert cpu.cold_copies(big, reordered=True) == [big]


def test_shape_classes_decode_prefill_vocabulary_and_backward_choose_apart(fresh_choice, monkeypatch):
    # A CPU where MKL wins at one row and oneDNN everywhere else.
    FakeClock(monkeypatch, lambda path, x, w: {"onednn": 2.0, "mkl": 1.0}[path] if x.numel() == x.shape[-1]
              else {"onednn": 1.0, "mkl": 2.0}[path])
    hidden, vocab = 16, 100
    weight, head = torch.randn(24, hidden, requires_grad=True), torch.randn(vocab, hidden)
    for _ in range(2 * (cpu.SAMPLES + 1)):
        for rows in (1, 9, 40):
            x = torch.randn(rows, hidden, requires_grad=True)
            cpu.linear(x, weight).backward(torch.randn(rows, 24))
            cpu.linear(x, head)
    picks = cpu.choices()
    # Three row counts x (layer forward, dL/dx, dL/dW, head forward); dL/dW at one row has one row
    # of x in the product's inner dimension, not its rows.
    assert len(picks) == 12, picks
    assert picks[cpu.shape_class(torch.empty(1, hidden), weight)] == "mkl"
    assert picks[cpu.shape_class(torch.empty(1, hidden), head)] == "mkl"
    assert picks[cpu.shape_class(torch.empty(1, 24), weight.t())] == "mkl"  # dL/dx at one row
    assert picks[cpu.shape_class(torch.empty(9, hidden), weight)] == "onednn"
    assert picks[cpu.shape_class(torch.empty(40, hidden), head)] == "onednn"


def test_a_fixed_path_skips_the_trials_and_a_bad_setting_names_the_variable(fresh_choice, monkeypatch):
    clock = FakeClock(monkeypatch, lambda path, x, w: 1.0)
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", "mkl")
    for _ in range(3):
        cpu.linear(torch.randn(4, 8), torch.randn(3, 8))
    assert clock.calls == ["mkl"] * 3 and cpu.choices() == {}
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", "blas")
    with pytest.raises(ValueError, match="MINIDPO_CPU_MATMUL must be auto, onednn or mkl, not 'blas'"):
        cpu.linear(torch.randn(4, 8), torch.randn(3, 8))


def test_choices_are_kept_on_disk_for_the_machines_next_runs(fresh_choice, monkeypatch):
    FakeClock(monkeypatch, lambda path, x, w: {"onednn": 2.0, "mkl": 1.0}[path])
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    cpu.linear(x, weight)
    this_machine, key = cpu.machine(), str(cpu.shape_class(x, weight))
    assert json.loads(cpu.choices_file().read_text()) == {this_machine: {key: "mkl"}}
    assert [p.name for p in cpu.choices_file().parent.iterdir()] == ["cpu_matmul.json"]  # no temporary left

    # The machine's next process, where timing would now pick oneDNN: the kept choice, untimed.
    monkeypatch.setattr(cpu, "_chosen", {})
    clock = FakeClock(monkeypatch, lambda path, x, w: {"onednn": 1.0, "mkl": 2.0}[path])
    cpu.linear(x, weight)
    assert clock.calls == ["mkl"]
    # Another CPU (or torch, or thread count) sharing the cache times for itself; both are kept.
    monkeypatch.setattr(cpu, "_chosen", {})
    monkeypatch.setattr(cpu, "machine", lambda: "another machine")
    cpu.linear(x, weight)
    assert cpu.choices() == {cpu.shape_class(x, weight): "onednn"}
    assert json.loads(cpu.choices_file().read_text()) == {this_machine: {key: "mkl"}, "another machine": {key: "onednn"}}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"MACHINE": [1]}', '{"MACHINE": {"KEY": "rm -rf /"}}',
                                     '{"MACHINE": {"KEY": ["mkl"]}}'])
def test_a_broken_or_foreign_choices_file_is_timed_again_and_rewritten(fresh_choice, monkeypatch, content):
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    key = str(cpu.shape_class(x, weight))
    cpu.choices_file().parent.mkdir()
    cpu.choices_file().write_text(content.replace("MACHINE", cpu.machine()).replace("KEY", key))
    clock = FakeClock(monkeypatch, lambda path, x, w: {"onednn": 2.0, "mkl": 1.0}[path])
    cpu.linear(x, weight)
    assert "onednn" in clock.calls  # timed: nothing usable was kept
    assert json.loads(cpu.choices_file().read_text())[cpu.machine()] == {key: "mkl"}


def test_an_unwritable_choices_file_keeps_the_choice_for_the_process(fresh_choice, monkeypatch, tmp_path):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("MINIDPO_CPU_CHOICES", str(tmp_path / "a file" / "cpu_matmul.json"))  # its folder cannot be made
    clock = FakeClock(monkeypatch, lambda path, x, w: {"onednn": 2.0, "mkl": 1.0}[path])
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    for _ in range(3):
        cpu.linear(x, weight)
    assert clock.calls[-3:] == ["mkl"] * 3 and cpu.choices() == {cpu.shape_class(x, weight): "mkl"}


def test_the_machine_is_named_by_its_cpu_model_torch_and_threads():
    name = cpu.machine()
    assert name.endswith(f" | torch {torch.__version__} | threads {torch.get_num_threads()}")
    if platform.system() == "Linux":  # /proc/cpuinfo: the family and model tell CPUs of one marketing name apart
        text = open("/proc/cpuinfo").read()
        vendor, family, model = (re.search(rf"^{field}\s*: (.*)$", text, re.M).group(1)
                                 for field in ("vendor_id", "cpu family", "model"))
        assert name.startswith(f"{vendor} family {family} model {model} (")


@pytest.fixture
def counted_reorders(monkeypatch):
    """The weights reordered into oneDNN's layout, in order."""
    reordered = []
    monkeypatch.setattr(cpu, "_reorder", lambda w, f=cpu._reorder: reordered.append(w) or f(w))
    return reordered


def test_reusing_weights_reorders_each_parameter_once_and_forgets_it_after(counted_reorders, monkeypatch):
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", "onednn")
    torch.manual_seed(0)
    weight, head, b = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(50, 16)), torch.randn(24)
    with torch.no_grad(), cpu.reusing_weights():
        for rows in (1, 7, 7, 32):  # a prefill and decode steps
            x = torch.randn(rows, 16)
            torch.testing.assert_close(cpu.linear(x, weight, b), F.linear(x.double(), weight.double(), b.double()).float())
            torch.testing.assert_close(cpu.linear(x, head), F.linear(x.double(), head.double()).float())
            cpu.linear(x, weight.detach())  # not a parameter: a new tensor each time, never kept
    assert [w is weight or w is head for w in counted_reorders] == [True, True]
    assert cpu._reordered is None
    cpu.linear(torch.randn(3, 16), weight)  # outside: no copy kept
    assert len(counted_reorders) == 2


def test_reused_weights_in_training_are_not_kept_for_the_backward_views(counted_reorders, monkeypatch):
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", "onednn")
    weight = torch.nn.Parameter(torch.randn(24, 16))
    x = torch.randn(5, 16, requires_grad=True)
    with cpu.reusing_weights():
        for _ in range(3):
            grad_x, grad_w = torch.autograd.grad(cpu.linear(x, weight).sum(), [x, weight])
    torch.testing.assert_close(grad_x, torch.ones(5, 24) @ weight.detach())
    torch.testing.assert_close(grad_w, torch.ones(5, 24).T @ x.detach())
    assert len(counted_reorders) == 1  # the forward's; dL/dx and dL/dW multiply transposed views


@pytest.mark.parametrize("autocast", [True, False])
def test_reused_bf16_weights_give_the_same_bits_as_f_linear(autocast, counted_reorders):
    # bf16 on CPU is oneDNN's product either way; reordering the weight once changes where it is
    # read from, not the arithmetic.
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    weight, bias = torch.nn.Parameter(torch.randn(96, 64, dtype=dtype)), torch.randn(96, dtype=dtype)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for rows in (1, 8, 33):
            x = torch.randn(rows, 1, 64, dtype=dtype)
            want = F.linear(x, weight, bias)
            with cpu.reusing_weights():
                got = [cpu.linear(x, weight, bias) for _ in range(2)]
            assert got[0].dtype == got[1].dtype == want.dtype == torch.bfloat16
            assert torch.equal(got[0], want) and torch.equal(got[1], want)
    # Once per reusing_weights() block, where PyTorch's bf16 path is oneDNN's (AVX-512); elsewhere never.
    reorders = 3 if cpu._onednn_bf16 else 0
    assert len(counted_reorders) == reorders
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), cpu.reusing_weights():
        plain = weight.detach()  # not a parameter: cast and computed, not kept
        assert torch.equal(cpu.linear(x, plain, bias), want)
    assert len(counted_reorders) == reorders


def test_without_onednn_bf16_kernels_bf16_products_are_pytorchs_own(counted_reorders, monkeypatch):
    # An AVX2 CPU (Zen 3 EPYC): oneDNN has no bf16 kernels there and cannot reorder a bf16 weight.
    monkeypatch.setattr(cpu, "_onednn_bf16", False)
    weight = torch.nn.Parameter(torch.randn(96, 64))
    x = torch.randn(8, 64)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), cpu.reusing_weights():
        got = cpu.linear(x, weight)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(got, F.linear(x, weight))
    assert counted_reorders == []


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
