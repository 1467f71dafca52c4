"""Three things that make minidpo fast on CPU, each measured in bench/RESULTS.md.

1. fp32 linear layers through the faster of two GEMM libraries for each shape, found by timing:
   MKL's sgemm (PyTorch's fp32 path) or oneDNN (its bf16 path), whose kernels are generated for
   the CPU. Which wins depends on the CPU and the shape (oneDNN by up to 2x on the AMD EPYCs of the
   results, MKL at hundreds of rows on their Zen 3), so each shape class times its first product on
   both, its weight read from memory as in a model (faster()), and keeps the faster; the two differ
   by rounding only. The choices are kept on disk per CPU model, torch version and thread count
   (choices_file()): the machine's next runs compute as its first did, without timing again.
   MINIDPO_CPU_MATMUL=onednn|mkl fixes the path; auto is the default. Other products go to
   F.linear (outside reusing_weights).
2. Weights reordered once for many products (reusing_weights). oneDNN copies a weight into its
   blocked layout at every product, which at a few rows costs as much as the product itself.
3. Freed memory kept for reuse (keep_freed_memory). glibc serves every allocation over 32 MiB
   with a fresh mmap and unmaps it on free, so each training step's large tensors (logits, the
   embedding's gradient) arrive as new pages that the kernel zero-fills on first touch."""

import contextlib
import ctypes
import glob
import itertools
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import cache_dir, read_json, write_json

_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_reorder = torch.ops.mkldnn._reorder_linear_weight if _onednn_linear is not None else None  # -> oneDNN's layout
# PyTorch's bf16 products are oneDNN's only where oneDNN has bf16 kernels for the CPU (AVX-512 or
# AVX-NE-CONVERT); elsewhere (an AVX2 Zen 3 EPYC) PyTorch's own, and oneDNN cannot reorder a bf16 weight.
_onednn_bf16 = _onednn_linear is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_reordered: dict | None = None  # inside reusing_weights(): (id(weight), dtype) -> (weight, its reordered copy)


def _onednn(x, weight, bias=None):
    """x @ weight^T + bias in x's dtype; in reusing_weights(), with a parameter's reordered copy
    (not a backward pass's transposed view of it: a new tensor at each product)."""
    if _reordered is None or not isinstance(weight, torch.nn.Parameter):
        return _onednn_linear(x, weight.to(x.dtype), bias, "none", [], "")
    key = (id(weight), x.dtype)
    if key not in _reordered:  # keeping the weight keeps its id from being reused
        _reordered[key] = (weight, _reorder(weight.to(x.dtype)))
    return _onednn_linear(x, _reordered[key][1], bias, "none", [], "")


def largest_cache_bytes() -> int:
    """The CPU's largest cache in bytes (Linux's sysfs writes "32768K"), or 32 MiB where it cannot be read."""
    sizes = [Path(p).read_text().strip() for p in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size")]
    return max((int(s[:-1]) << {"K": 10, "M": 20}[s[-1]] for s in sizes if s[:-1].isdigit() and s[-1] in "KM"),
               default=32 << 20)


PATHS = {"onednn": _onednn, "mkl": F.linear}
SAMPLES = 3  # timed calls per path at least, after one warm-up call each...
MIN_SECONDS = 0.005  # ...and until each path has spent this long (up to MAX_CALLS calls)
MAX_CALLS = 100
CACHE_BYTES = largest_cache_bytes()
_chosen: dict[tuple, str] = {}  # shape class -> the faster path
_clock = time.perf_counter


@contextlib.contextmanager
def reusing_weights():
    """Within, each weight's copy in oneDNN's blocked layout is made once and kept, for products without
    gradients that reuse unchanged weights: a generation's decode steps (2-core AMD EPYC Zen 4: 1.4x faster fp32
    decoding at 8 rows, 1.15x at 32). fp32 products on the oneDNN path, and every bf16 one where PyTorch's
    bf16 path is oneDNN (plain or under autocast: the bits are the same). Costs the weights' size in memory."""
    global _reordered
    outer, _reordered = _reordered, {} if _reorder is not None else None  # None: a build without oneDNN
    try:
        yield
    finally:
        _reordered = outer


def shape_class(x, weight) -> tuple:
    """(rows, in, out) of x [..., in] @ weight [out, in]^T, each rounded up to a power of two,
    whether x and weight have unit stride along `in` (a transposed view is another product), and
    whether the weights are reused (reusing_weights: oneDNN then skips its copy)."""
    rows = math.prod(x.shape[:-1])
    rounded = (1 << max(n - 1, 0).bit_length() for n in (rows, *weight.shape))
    return (*rounded, x.stride(-1) == 1, weight.stride(-1) == 1, _reordered is not None)


def cold_copies(weight, reordered: bool) -> list:
    """Copies of `weight` that together overflow the CPU's largest cache (none if it alone does), in
    oneDNN's layout if `reordered`: cycling through them, each product reads its weight from memory."""
    size = weight.numel() * weight.element_size()
    if size >= CACHE_BYTES:  # in reusing_weights(), _onednn reorders a parameter itself, once
        return [weight]
    copies = (weight.detach().clone() for _ in range(min(CACHE_BYTES // size + 2, MAX_CALLS + 1)))  # strides kept
    return [_reorder(copy) if reordered else copy for copy in copies]  # one plain copy at a time to reorder


def faster(x, weight, bias) -> str:
    """The path that computes this product faster: a warm-up call each (oneDNN builds its kernel
    then), then calls taking turns, at least SAMPLES each and for small products enough for
    MIN_SECONDS each; the best call of each path counts. A 0.1 ms product thus takes the best of
    ~50 calls: on a shared machine a thread descheduled for a few calls (steal time) does not pick
    the slower path for the whole process. Each call multiplies the next of cold_copies(weight): in
    a model, the rest of the model passes between two products with a weight, so it comes from
    memory. (Timed again and again on one weight held in cache, MKL won the batch-1 and 32-row
    decode products on a Zen 3 EPYC, where from memory oneDNN is 1.4x and 1.8x faster.)
    The results are thrown away, so every product of a class, its first included, is computed on
    one path: within a process, equal inputs give equal outputs (the policy and the reference agree exactly)."""
    reordered = _reordered is not None and isinstance(weight, torch.nn.Parameter)  # as _onednn reads it
    operands = {path: itertools.cycle(cold_copies(weight, reordered and path == "onednn")) for path in PATHS}
    times = {path: [] for path in PATHS}

    def enough(calls):
        return len(calls) > MAX_CALLS or len(calls) > SAMPLES and sum(calls[1:]) >= MIN_SECONDS

    while not all(enough(calls) for calls in times.values()):
        for path, product in PATHS.items():
            operand = next(operands[path])
            start = _clock()
            product(x, operand, bias)
            times[path].append(_clock() - start)
    return min(times, key=lambda path: min(times[path][1:]))


def cpu_model() -> str:
    """The CPU's vendor, family, model and name from /proc/cpuinfo (a VM may name a Zen 3 and a Zen 4
    both "AMD EPYC"), or what the platform module says elsewhere."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    return f"{info.get('vendor_id')} family {info.get('cpu family')} model {info.get('model')} ({info.get('model name')})"


def choices_file() -> Path:
    """$MINIDPO_CPU_CHOICES, or cpu_matmul.json in minidpo's cache: {machine(): {shape class: path}} for every
    machine sharing it. Delete it to time again."""
    return Path(os.environ.get("MINIDPO_CPU_CHOICES") or cache_dir() / "cpu_matmul.json")


def machine() -> str:
    """What a choice holds for: the CPU model, torch's version and its thread count."""
    return f"{cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()}"


def kept_choices() -> dict:
    """{machine: {shape class: path}} from choices_file(), less what is not that; {} where the file is
    missing or unreadable (a cache: its shape classes are timed again and the file rewritten)."""
    try:
        kept = read_json(choices_file())
    except (OSError, ValueError):
        return {}
    return {name: {key: path for key, path in mine.items() if isinstance(path, str) and path in PATHS}
            for name, mine in kept.items() if isinstance(mine, dict)}


def keep(key: tuple, path: str):
    """Add one choice to choices_file(), written whole under a temporary name and renamed over the old
    file: a crash never leaves it half-written (two processes adding at once may lose one choice,
    timed again next time). Where it cannot be written (a read-only home), the choice holds for this process."""
    everything = kept_choices()
    everything.setdefault(machine(), {})[str(key)] = path
    target = choices_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        write_json(temporary, everything)
        os.replace(temporary, target)
    except OSError:
        pass


def _mm(x, weight, bias=None):
    """x [..., in] @ weight [out, in]^T (+ bias) on the path of its shape class; either may be a strided view."""
    setting = os.environ.get("MINIDPO_CPU_MATMUL", "auto")
    if setting != "auto":
        if setting not in PATHS:
            raise ValueError(f"MINIDPO_CPU_MATMUL must be auto, onednn or mkl, not {setting!r}")
        return PATHS[setting](x, weight, bias)
    key = shape_class(x, weight)
    if key not in _chosen:
        _chosen[key] = kept_choices().get(machine(), {}).get(str(key))
        if _chosen[key] is None:  # first met on this machine
            _chosen[key] = faster(x, weight, bias)
            keep(key, _chosen[key])
    return PATHS[_chosen[key]](x, weight, bias)


def choices() -> dict[tuple, str]:
    """The path chosen so far for each shape class (see shape_class)."""
    return dict(_chosen)


class _Linear(torch.autograd.Function):
    """oneDNN's linear op has no backward; the two backward products go through _mm too, on
    transposed views:  y = x W^T + b,  dL/dx = g W,  dL/dW = g^T x,  dL/db = sum of g over rows."""

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


def chooses_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) chooses between oneDNN and MKL: fp32 on CPU, outside autocast."""
    return (_onednn_linear is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), for fp32 on CPU through the faster of oneDNN and MKL (_mm); bf16
    on CPU inside reusing_weights() through oneDNN with the weight reordered once (where it is PyTorch's path)."""
    if _reordered is not None and _onednn_bf16 and x.device.type == "cpu" and not torch.is_grad_enabled() and (
            x.dtype == weight.dtype == torch.bfloat16
            or torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        bias = None if bias is None else bias.to(torch.bfloat16)  # as autocast would cast them
        return _onednn(x.to(torch.bfloat16), weight, bias)
    if not chooses_path(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _Linear.apply(x, weight, bias) if needs_grad else _mm(x, weight, bias)


def fast_bf16() -> bool:
    """Whether bf16 products are fast here: on a GPU, or on a CPU whose oneDNN has bf16 kernels. (On an
    AVX2 Zen 3 EPYC, PyTorch's own bf16 product of 512 rows by SmolLM2's MLP takes 4.3x the fp32 one.)"""
    return torch.cuda.is_available() or _onednn_bf16


# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the next allocation; False if not glibc.

    With mmap off every block comes from the heap, and with the trim threshold at its maximum
    the heap is never shrunk, so a step's large tensors land on pages the previous step already
    touched. The cost is memory the process never returns to the system before it exits; its
    peak is nearly the same (bench/RESULTS.md). Call it once, before the tensors it should cover."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
