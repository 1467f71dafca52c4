"""The decoder-only transformer behind every model minidpo loads.

One module covers the Hugging Face families Llama (SmolLM2, TinyLlama, Llama 3), Qwen2, Qwen3, Mistral, Gemma 2 and 3,
Phi-3, OLMo 2, SmolLM3 and GPT-NeoX (Pythia); their differences are the switches in ModelConfig. checkpoint.py maps each
family's config.json and tensor names onto this module.

Three choices run through the file:
- A token's rotary position is the number of real (unmasked) tokens before it. Left-padded prompts therefore get the
  same positions as unpadded ones, and every row of a batch computes what it would compute alone.
- A sliding window is measured in those positions too: a query at position p sees keys at positions p - window + 1 .. p.
  Left padding, cache columns and packed rows whose positions restart (packing.py) all see the window a row alone would.
- q/k/v are one matmul and so are the SwiGLU gate and up projections: fewer, larger kernels for the sampler's small
  decode steps. checkpoint.py fuses and splits them at the file boundary."""

from dataclasses import dataclass, field
from functools import partial
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cpu import linear
from .logprobs import softcap, token_logprobs

tanh_gelu = partial(F.gelu, approximate="tanh")  # what transformers calls gelu_new and gelu_pytorch_tanh
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None rotates the whole head; GPT-NeoX rotates a fraction
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}
    norm_eps: float = 1e-5
    layer_norm: bool = False  # GPT-NeoX: LayerNorm with bias; the others: RMSNorm
    gated_mlp: bool = True  # SwiGLU (Llama, Qwen2) or a plain two-layer MLP (GPT-NeoX)
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False  # GPT-NeoX: attention and MLP both read the block's input
    tie_word_embeddings: bool = False
    num_labels: int = 0  # > 0: a sequence-classification (reward) model with a `score` head
    # The later families' switches (transformers' modeling files give the formulas):
    norm_layout: str = "pre"  # "pre": norm, sublayer, add; "sandwich" (Gemma): norms before and after the
    # sublayer; "post" (OLMo 2): sublayer, norm, add
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + weight)
    norm_weight_fp32: bool = False  # Gemma, OLMo 2: scale the fp32 normalised x, then cast (Llama casts first)
    qk_norm: str | None = None  # RMSNorm of queries and keys before rotary: "head" over each head (Qwen3,
    # Gemma 3), "proj" over the whole projection (OLMo 2)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to their dtype
    attn_scale: float | None = None  # None: head_dim^-0.5; Gemma: query_pre_attn_scalar^-0.5
    attn_softcap: float | None = None  # Gemma 2: attention scores s -> cap * tanh(s / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    sliding_window: int | None = None  # a sliding layer's query sees the keys < window positions behind it
    layer_types: list | None = None  # per layer "sliding_attention" or "full_attention"; None: all full
    local_rope_theta: float | None = None  # Gemma 3: the rotary base of sliding layers (no rescaling)
    rope_layers: list | None = None  # SmolLM3: 0 for a layer that applies no rotary; None: all do
    rope_fp32: bool = False  # OLMo 2: rotate in fp32 even with bf16 weights
    hf_config: dict | None = field(default=None, repr=False)  # the config.json it came from; saved back
    generation_config: dict | None = field(default=None, repr=False)  # its generation_config.json, if any; saved back

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")

    def is_local(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d) for i < d/2, with the linear or Llama 3 rescaling; `local`:
    Gemma 3's sliding layers, theta = local_rope_theta and no rescaling."""
    dim = cfg.rotary_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = {} if local else cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: wavelengths above the original context / low_freq_factor are slowed down by `factor`, those below
        # context / high_freq_factor are kept, and the band between is interpolated linearly in context/wavelength.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [B, H, T, head_dim] in "half" layout:
    pairs are (i, i + d/2), not adjacent features (the HF checkpoints are stored that way)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = (rot * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)  # fp32 cos/sin: rotated in fp32
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def recompute_in_backward(fn, x):
    """fn(x), keeping only x for backward and running fn again there. For the norms and the gated activation:
    elementwise steps that take a few percent of a step's time but whose intermediate results (a norm keeps two copies
    of its input, SwiGLU one of half its input) are about a quarter of the activations a training forward pass keeps."""
    return checkpoint(fn, x, use_reentrant=False) if torch.is_grad_enabled() and x.requires_grad else fn(x)


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU products take the faster of oneDNN and MKL (cpu.py); the same parameters."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight); Gemma stores weight - 1 (offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.weight_fp32 = eps, offset, weight_fp32

    def forward(self, x):
        # Normalise in fp32: squares of bf16 activations lose too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return ((self.offset + self.weight.float()) * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.layer_norm:
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.norm_eps, cfg.norm_offset, cfg.norm_weight_fp32)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap, self.qk_norm = cfg.attn_scale or cfg.head_dim**-0.5, cfg.attn_softcap, cfg.qk_norm
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.out = Linear(q_dim, cfg.hidden_size, bias=cfg.out_bias)
        if cfg.qk_norm:
            per_head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, cfg.head_dim if per_head else q_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim if per_head else kv_dim)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        """x [B, T, hidden]; cos/sin None in a layer without rotary; mask [B, 1, group*T, S] bool (fold_groups), None
        for causal; kv: this layer's (keys, values) cache [B, kv_heads, S, head_dim], written at columns `slots`."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        if self.qk_norm:  # each over the whole projection ("proj") or over each head
            q, k = qk.split([H * D, Hkv * D], dim=-1)
            if self.qk_norm == "proj":
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q = self.q_norm(q.unflatten(-1, (H, D))).flatten(-2)
                k = self.k_norm(k.unflatten(-1, (Hkv, D))).flatten(-2)
            qk = torch.cat((q, k), dim=-1)
        # Queries and keys rotate together: one rotary pass, not two (a decode step's time is largely per-op overhead).
        qk = qk.unflatten(-1, (H + Hkv, D)).transpose(1, 2)  # [B, H + Hkv, T, D]
        if cos is not None:
            qk = apply_rope(qk, cos, sin)
        q, k = qk.split([H, Hkv], dim=1)
        v = v.unflatten(-1, (Hkv, D)).transpose(1, 2)
        if kv is not None:
            kv[0].index_copy_(2, slots, k.to(kv[0].dtype))  # under autocast a q/k norm may leave k in fp32
            kv[1].index_copy_(2, slots, v)
            k, v = kv
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv, scale=self.scale)
        else:
            # With a mask, fused kernels reject enable_gqa and fall back to the slow math path.
            # Fold each KV group's query heads into the query axis instead ([B, Hkv, group*T, D]), as
            # the mask's rows are (fold_groups). Keys and values are never copied.
            q = q.reshape(B, Hkv, H // Hkv * T, D)
            if self.softcap or (T == 1 and x.device.type == "cpu"):
                # Spelled out: soft-capping has no fused kernel, and for a CPU decode step (one query
                # per row) the fused kernel's setup costs about twice the arithmetic.
                scores = (q @ k.transpose(-1, -2)).mul_(self.scale)
                if self.softcap:  # not in place: tanh's backward reads its output
                    scores = torch.tanh(scores / self.softcap) * self.softcap
                scores = torch.where(mask, scores, -math.inf).softmax(-1, dtype=torch.float32)
                y = scores.to(q.dtype) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out(y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.activation]
        # Gated: one matmul yields [gate | up] side by side along the features.
        width = 2 * cfg.intermediate_size if cfg.gated_mlp else cfg.intermediate_size
        self.up = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.up(x)
        return self.down(recompute_in_backward(self.gated_activation, h) if self.gated else self.act(h))

    def gated_activation(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        pre, post = cfg.norm_layout in ("pre", "sandwich"), cfg.norm_layout in ("post", "sandwich")
        self.attn_norm, self.attn = make_norm(cfg) if pre else None, Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg) if pre else None, MLP(cfg)
        self.attn_post_norm = make_norm(cfg) if post else None
        self.mlp_post_norm = make_norm(cfg) if post else None

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        attn = self.attn(normed(self.attn_norm, x), cos, sin, mask, kv, slots)
        if self.parallel_residual:
            return x + attn + self.mlp(normed(self.mlp_norm, x))
        x = x + normed(self.attn_post_norm, attn)
        return x + normed(self.mlp_post_norm, self.mlp(normed(self.mlp_norm, x)))


def normed(norm, x):
    return x if norm is None else recompute_in_backward(norm, x)


class KVCache:
    """Static key/value buffers for batched decoding, allocated once and reused.

    Columns ("slots") are shared by all rows: a left-padded batch fills column j of every row in the same step, so a
    decode step writes one column and a CUDA graph can replay it with only the slot index changing. `valid` marks the
    columns that hold real tokens; padding columns stay False and are masked out of attention."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    def view(self, rows: slice, columns: int | None = None) -> "KVCache":
        """A view into this cache: some rows (the first R, or every n-th), the first `columns` columns (None: all)."""
        view = object.__new__(KVCache)
        view.k = [k[rows, :, :columns] for k in self.k]
        view.v = [v[rows, :, :columns] for v in self.v]
        view.valid = self.valid[rows, :columns]
        return view


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        if cfg.num_labels:
            self.score = Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Not in checkpoints: a model built on the meta device gets real values from the loader.
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.local_rope_theta is not None:
            self.register_buffer("local_inv_freq", rope_inv_freq(cfg, local=True), persistent=False)
        # Recompute each block's activations in backward instead of keeping them (--gradient_checkpointing).
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, slots=None, logits_to_keep=0,
                positions=None, block_mask=None, targets=None):
        """Logits [B, T, vocab] (a reward model: [B, T, num_labels]).

        input_ids [B, T]; attention_mask [B, T] with 0 at padding (None: no padding).
        With a cache, the T tokens are written at cache columns `slots` (a LongTensor [T]) and attend to every valid
        earlier column. logits_to_keep: an int k > 0 projects only the last k positions (the sampler needs one; the full
        [B, T, vocab] would dwarf the rest of a prefill), a LongTensor [K] projects those positions of every row.
        A packed batch (packing.py) gives `positions` [B, T] and `block_mask` [B, T, T] (bool): which
        keys each query sees, in place of attention_mask. With targets [B, K] (K: the positions kept) it returns
        log p(targets) [B, K] in fp32 instead of logits, never holding them whole (logprobs.py)."""
        B, T = input_ids.shape
        if block_mask is not None:
            mask, key_positions = block_mask[:, None], positions
        elif cache is not None:
            cache.valid[:, slots] = attention_mask.bool() if attention_mask is not None else True
            key_positions = cache.valid.cumsum(-1) - 1
            positions = key_positions.index_select(1, slots)
            mask = self.attention_mask(cache.valid, slots)
        elif attention_mask is not None:
            positions = key_positions = attention_mask.long().cumsum(-1) - 1
            mask = self.attention_mask(attention_mask.bool(), torch.arange(T, device=input_ids.device))
        else:
            positions = key_positions = torch.arange(T, device=input_ids.device).expand(B, T)
            # None: SDPA's plain causal attention, unless soft-capping (spelled out) needs a mask
            mask = causal_mask(T, input_ids.device) if self.cfg.attn_softcap else None
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        if self.cfg.sliding_window is not None:
            near = positions[:, None, :, None] - key_positions[:, None, None, :] < self.cfg.sliding_window
            sliding_mask = fold_groups(near & (mask if mask is not None else causal_mask(T, input_ids.device)), group)
        mask = fold_groups(mask, group)
        x = self.embed(input_ids)
        if self.cfg.embed_scale:  # Gemma rounds sqrt(hidden_size) to the embeddings' dtype first
            x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)  # 0-dim: a scalar on any device
        rope_dtype = torch.float32 if self.cfg.rope_fp32 else x.dtype
        rope = self.rope(positions.clamp(min=0), self.inv_freq, rope_dtype)
        if self.cfg.local_rope_theta is not None:
            local_rope = self.rope(positions.clamp(min=0), self.local_inv_freq, rope_dtype)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            cos, sin = local_rope if self.cfg.local_rope_theta is not None and self.cfg.is_local(i) else rope
            if self.cfg.rope_layers is not None and not self.cfg.rope_layers[i]:
                cos = sin = None
            layer_mask = sliding_mask if self.cfg.sliding_window is not None and self.cfg.is_local(i) else mask
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layer_mask, kv, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_mask, kv, slots)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        if self.cfg.num_labels:
            return self.score(x)
        weight = self.embed.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        if targets is not None:
            return token_logprobs(x, weight, targets, cap=self.cfg.final_softcap)
        return softcap(linear(x, weight), self.cfg.final_softcap)

    @staticmethod
    def rope(positions, inv_freq, dtype):
        """cos and sin [B, 1, T, rotary_dim] for integer positions [B, T], computed in fp32 and given
        `dtype` (the residual stream's), as transformers does: under bf16 autocast with fp32 weights
        the bf16 queries and keys are then rotated in fp32 (and cast back: attention reads bf16)."""
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def attention_mask(key_valid, query_slots):
        """[B, 1, T, S]: query i (at column query_slots[i]) sees valid keys at columns <= its own. A padding query sees
        only itself, so no row of the softmax is empty (which gives NaN); its output is never used."""
        key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
        causal = key_slots[None, :] <= query_slots[:, None]
        itself = key_slots[None, :] == query_slots[:, None]
        return (key_valid[:, None, None, :] & causal) | itself


def fold_groups(mask, group: int):
    """A mask [B, 1, T, S] with its rows repeated for each query head of a KV group, [B, 1, group*T, S]:
    attention folds a group's heads into the query axis. Once per forward, not once per layer."""
    return None if mask is None else mask.repeat(1, 1, group, 1)


def causal_mask(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, T, T]


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A reward model's output [B, T, num_labels] read at each row's last real token -> [B, num_labels].
    Taking the rightmost unmasked column works for left and right padding alike."""
    columns = torch.arange(scores.shape[1], device=scores.device)
    last = (columns * attention_mask).argmax(-1)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]
