"""Sampling completions from the policy: static KV cache, one prefill per prompt, CUDA-graph decode.

Online DPO samples n (usually 2) completions per prompt from the weights being trained, at every step, so
generation is most of a step's time. What keeps it fast:
- The KV cache is allocated once and reused by every call; it only grows.
- A prompt is prefilled once; its n samples copy its keys and values instead of recomputing them.
- On CPU each weight is copied into oneDNN's blocked layout once per call, into memory the previous call freed (cpu.py).
- On CUDA the one-token decode step is a captured CUDA graph: one launch per step instead of hundreds of small
  kernels, still valid after the optimizer's in-place updates (Sampler).
- Sampling draws one random number per row, and the decode loop waits for the device only to ask whether every
  row has finished."""

from dataclasses import dataclass
import bisect
import math

import torch

from .cpu import keep_freed_memory, reusing_weights
from .model import KVCache, Transformer


@dataclass
class Completions:
    """Completions in prompt-major order: prompt i's n samples are rows i*n .. i*n+n-1."""

    ids: torch.Tensor  # [rows, T] token ids, pad after a row's first EOS (the EOS itself is kept)
    mask: torch.Tensor  # [rows, T] 1 on the row's real tokens, its EOS included; 0 on padding
    has_eos: torch.Tensor  # [rows] bool: the row ended with an EOS within max_new_tokens (not a stop string)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """One token id per row of logits [R, V]; temperature 0 is greedy.

    The filters apply in transformers' order, each to what the previous one left: temperature,
    top-k (0: off), top-p (1: off), min-p (0: off). All of it in fp32, whatever the model's dtype."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p < 1:
        # Keep the fewest best tokens that together hold top_p of the probability: a token is dropped
        # when the tokens ranked above it already hold top_p. The best token always stays.
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
    # Inverse-CDF sampling, one uniform number per row. (torch.multinomial draws one exponential per
    # vocabulary entry: on CPU that costs more than all the rest of this function.)
    cdf = logits.softmax(-1).cumsum(-1)
    # u lies in (0, cdf[-1]], so the first i with cdf[i] >= u is never a token of probability 0.
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    u = (1 - uniform) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1)


def penalize_repetition(logits, seen, penalty: float):
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of each token already seen (seen
    [R, V] bool: in the prompt or the completion so far) is divided by `penalty` if positive and
    multiplied by it if not, so that penalty > 1 makes every seen token less likely."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def stop_string_ends(ids, stop_strings, decode) -> torch.Tensor:
    """[rows, T] bool: True at the token with which a row's decoded text first contains one of
    `stop_strings` (as transformers' stop_strings end a row: that token is kept)."""
    ends = torch.zeros(ids.shape, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        def stopped(length):
            return any(s in decode(row[:length]) for s in stop_strings)
        if stopped(len(row)):  # a prefix holds a stop string: find the shortest, by bisection
            ends[r, bisect.bisect_left(range(1, len(row) + 1), True, key=stopped)] = True
    return ends.to(ids.device)


def bucket(rows: int) -> int:
    """The power of two a batch of `rows` runs at under CUDA graphs: one graph per bucket."""
    return 1 << (rows - 1).bit_length()


class DecodeGraph:
    """The one-token decode step for a fixed number of rows, captured once as a CUDA graph.

    replay() runs the step on whatever is in the static `token` and `slot` buffers and leaves the
    logits in `logits`; copy inputs in, read outputs out."""

    def __init__(self, step_fn, cache: KVCache, rows: int):
        device = cache.valid.device
        # The graph reads its inputs at fixed addresses: all three must live as long as it does.
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.real = torch.ones(rows, 1, dtype=torch.long, device=device)  # the attention mask: no padding
        cache = cache.view(slice(0, rows))

        def step():
            return step_fn(self.token, self.real, cache=cache, slots=self.slot, logits_to_keep=1)[:, -1]

        # Warm up on a side stream before capture, as PyTorch's recipe says: one-time work (cuBLAS
        # handles, kernel selection, compilation) must not land inside the graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()


class Sampler:
    """Generates from `model`, keeping its KV cache and CUDA graphs from one call to the next.

    Keep one Sampler per model for the whole run. Graphs read the weights at the addresses they had at capture: in-place
    optimizer updates need no recapture, a replaced weight tensor (a checkpoint loaded with assign=True, the model
    moved, FSDP2's fresh storage at every gather) does. Under FSDP2 that is once per rollout; on an H100 (Qwen2-0.5B
    shape, 16 rows x 64 tokens) a rollout took 0.37 s recapturing and 0.27 s with graphs kept, still far below eager
    decoding. `dtype`: what the gathered weights compute in (the trainer passes bf16 under --bf16), since the sharded
    weights read fp32; the KV cache is allocated in it."""

    def __init__(self, model: Transformer, cuda_graphs: bool = True, compile: bool = False, dtype=None):
        self.model = model
        # On CPU each call's weight copies reuse the last call's pages (cpu.py). SmolLM2, 32 rows x 33
        # tokens on a Zen 3 EPYC: 70,000-90,000 page faults a call without, none with.
        if model.embed.weight.device.type == "cpu":
            keep_freed_memory()
        # Compute in `dtype` (e.g. bf16 for fp32 weights under --bf16) through autocast. Its weight cache (a bf16 copy
        # of each weight, kept until the autocast block ends) is off with CUDA graphs: the copy would be baked into a
        # graph and miss optimizer updates. Without graphs it is on, so a weight is cast once per generate() call, not
        # once per token. (CPU linears bypass it: cpu.reusing_weights casts and reorders each weight once itself.)
        self.dtype = dtype or model.embed.weight.dtype
        self.autocast = self.dtype != model.embed.weight.dtype
        self.use_graphs = cuda_graphs and model.embed.weight.is_cuda
        # A decode step is ~30 small kernels per layer (norms, rotary, residuals) around 4 matmuls; a
        # graph removes their launch cost but not their count. torch.compile fuses them, at the price
        # of a compilation (about a minute) per row bucket on first use.
        self.step_fn = torch.compile(model, dynamic=False, fullgraph=True) if compile else model
        self.cache = None
        self.graphs = {}  # rows (a power of two) -> DecodeGraph on the first rows of self.cache
        self.graphed_weights = []  # the weights' addresses when the graphs were captured
        self.captures = 0  # how many graphs were ever captured; tests check that none is redone

    def generate(self, input_ids, attention_mask, n=1, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0, eos_token_ids=(), pad_token_id=0, min_new_tokens=0, generator=None,
                 repetition_penalty=1.0, stop_strings=(), decode=None) -> Completions:
        """n completions for each left-padded prompt of input_ids / attention_mask [B, P].

        Stops at max_new_tokens, or as soon as every row has produced one of eos_token_ids (never before min_new_tokens:
        EOS is suppressed until then). A row also ends with the token that completes one of stop_strings in its text
        (`decode`: ids -> text), cut after the loop. `generator` must be on the model's device."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        device = self.model.embed.weight.device
        with self.no_autograd(), self.compute_dtype(), reusing_weights():
            ids, is_eos = self._generate(input_ids.to(device), attention_mask.to(device), n, max_new_tokens,
                                         temperature, top_k, top_p, min_p, eos_token_ids, pad_token_id,
                                         min_new_tokens, generator, repetition_penalty)
        ids, is_eos = ids.clone(), is_eos.clone()  # inference_mode's tensors made plain ones, which callers may change
        ends = is_eos | stop_string_ends(ids, stop_strings, decode) if stop_strings else is_eos
        # Everything after a row's end (its first EOS or stop string) is pad; the mask covers the end itself.
        after_end = ends.cumsum(-1) - ends.long() > 0
        ids.masked_fill_(after_end, pad_token_id)
        mask = (~after_end).long()
        length = int(mask.sum(-1).max())
        return Completions(ids[:, :length], mask[:, :length], (is_eos & ~after_end).any(-1))

    def stream(self, input_ids, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
               eos_token_ids=(), generator=None):
        """Yield one completion of one prompt (input_ids [1, P], no padding) token id by token id, as each is sampled:
        for a reply shown as it is written (the chat CLI). Stops after max_new_tokens or at an EOS (not yielded)."""
        prompt = input_ids.to(self.model.embed.weight.device)
        with self.no_autograd():
            self.reserve(1, prompt.shape[1] + max_new_tokens)
        for t in range(max_new_tokens):
            with self.no_autograd(), self.compute_dtype():
                logits = (self.prefill(prompt, torch.ones_like(prompt), 1) if t == 0
                          else self.decode(token, prompt.shape[1] + t - 1))
                token = sample(logits, temperature, top_k, top_p, min_p, generator)
            if token.item() in eos_token_ids:
                return
            yield token.item()

    def no_autograd(self):
        """On CPU inference_mode, which skips autograd's per-op bookkeeping too (a SmolLM2-deep decode step
        at near-zero arithmetic: 22 -> 17.5 ms on a Zen 3 EPYC; generate() returns copies, which backward
        may save). On CUDA no_grad: graphs replay anyway, and autocast caches weight casts only there."""
        return torch.inference_mode() if self.model.embed.weight.device.type == "cpu" else torch.no_grad()

    def compute_dtype(self):
        device_type = self.model.embed.weight.device.type
        return torch.autocast(device_type, self.dtype, enabled=self.autocast, cache_enabled=not self.use_graphs)

    def _generate(self, input_ids, attention_mask, n, max_new_tokens, temperature, top_k, top_p, min_p,
                  eos_token_ids, pad_token_id, min_new_tokens, generator, repetition_penalty):
        """(ids [rows, max_new_tokens or fewer], is_eos [rows, same] bool): the tokens sampled, not yet cut."""
        device = input_ids.device
        prompts, prompt_len = input_ids.shape
        rows = prompts * n
        self.reserve(rows, prompt_len + max_new_tokens)
        logits = self.prefill(input_ids, attention_mask, n)
        if repetition_penalty != 1:  # the prompt's tokens (not its padding), then each sampled one
            seen = torch.zeros(prompts, logits.shape[-1], dtype=torch.long, device=device)
            seen = seen.scatter_add_(1, input_ids, attention_mask).repeat_interleave(n, 0) > 0

        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        ids = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # `finished.all()` makes the host wait for the device. On CPU that costs nothing; on CUDA it
        # drains the queue of launched work, so check every few steps and waste at most a few steps.
        check_every = 8 if device.type == "cuda" else 1
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits.index_fill_(-1, eos, -math.inf)
            if repetition_penalty != 1:  # on the logits a CUDA graph wrote, outside it: the graph stays valid
                logits = penalize_repetition(logits, seen, repetition_penalty)
            token = sample(logits, temperature, top_k, top_p, min_p, generator)
            ids[:, t] = token
            if repetition_penalty != 1:
                seen[torch.arange(rows, device=device), token] = True
            finished |= torch.isin(token, eos)
            if t == max_new_tokens - 1 or (t % check_every == check_every - 1 and finished.all()):
                break
            logits = self.decode(token, prompt_len + t)
        return ids, torch.isin(ids, eos)

    def prefill(self, input_ids, attention_mask, n: int):
        """Write the prompts [B, P] into the cache, prompt i into rows i*n .. i*n+n-1, and return
        the logits [B*n, V] that follow each row's prompt. The cache must be reserved first."""
        prompts, prompt_len = input_ids.shape
        # Forget the previous call. (Its columns would never be read anyway: a query sees only columns
        # up to its own, and this call rewrites those first. But an empty cache needs no such argument.)
        self.cache.valid.zero_()
        # Prefill the first sample of each prompt (rows 0, n, 2n, ...), then copy its prompt columns over its
        # n - 1 siblings' rows, so that a prompt's samples decode from identical caches.
        first_rows = self.cache.view(slice(0, prompts * n, n), prompt_len)
        slots = torch.arange(prompt_len, device=input_ids.device)
        logits = self.model(input_ids, attention_mask, cache=first_rows, slots=slots, logits_to_keep=1)
        for buf in self.cache.k + self.cache.v:  # [rows, kv_heads, columns, head_dim]
            siblings = buf[: prompts * n, :, :prompt_len].unflatten(0, (prompts, n))
            siblings[:, 1:] = siblings[:, :1]
        siblings = self.cache.valid[: prompts * n, :prompt_len].unflatten(0, (prompts, n))
        siblings[:, 1:] = siblings[:, :1]
        return logits[:, -1].repeat_interleave(n, 0)

    def reserve(self, rows: int, length: int):
        """Make sure the cache holds `rows` rows of `length` columns and, with graphs, that the
        decode graph for this row count exists. A cache is only replaced by a larger one."""
        positions = (self.model.cfg.hf_config or {}).get("max_position_embeddings")
        if positions and length > positions:  # beyond them the model was never trained (and memory runs out)
            raise ValueError(f"{length} tokens (prompt and new tokens) do not fit the model's {positions} "
                             "positions (max_position_embeddings)")
        rows = bucket(rows)
        old_rows, old_length = self.cache.valid.shape if self.cache is not None else (0, 0)
        if rows > old_rows or length > old_length:
            # Grow to cover the old shape too, so that calls of different shapes don't alternate. (Over
            # a training run the longest prompt so far changes only a few times, so no rounding up.)
            self.cache = self.graphs = None  # free the old buffers before allocating the new ones
            self.cache = KVCache(self.model.cfg, max(rows, old_rows), max(length, old_length), self.dtype,
                                 self.model.embed.weight.device)
            self.graphs = {}
        if not self.use_graphs:
            return
        weights = [t.data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]]
        if weights != self.graphed_weights:
            self.graphs, self.graphed_weights = {}, weights
        if rows not in self.graphs:
            with self.compute_dtype():  # reserve() may be called from outside generate()
                self.graphs[rows] = DecodeGraph(self.step_fn, self.cache, rows)
            self.captures += 1

    def decode(self, token, column: int):
        """Logits [rows, V] for one new token per row, written at cache column `column`."""
        rows = token.shape[0]
        if not self.use_graphs:
            # Attend over the columns written so far, not the whole cache; a compiled step keeps one
            # shape (a new shape would compile again), as a graph's must.
            columns = column + 1 if self.step_fn is self.model else None
            step, cache = token[:, None], self.cache.view(slice(0, rows), columns)
            slot = torch.full((1,), column, device=token.device)  # a fill on the device: no host-to-device copy
            return self.step_fn(step, torch.ones_like(step), cache=cache, slots=slot, logits_to_keep=1)[:, -1]
        graph = self.graphs[bucket(rows)]
        graph.token[:rows, 0] = token  # rows beyond `rows` decode stale tokens; their output is unused
        graph.slot.fill_(column)
        graph.graph.replay()
        return graph.logits[:rows]


def generate(model: Transformer, input_ids, attention_mask, **kwargs) -> Completions:
    """One-off generation (see Sampler.generate for the arguments). Without CUDA graphs: capturing
    them costs more than one call gains. Keep a Sampler to reuse its cache and graphs."""
    return Sampler(model, cuda_graphs=False).generate(input_ids, attention_mask, **kwargs)
