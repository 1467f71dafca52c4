"""PairRM, llm-blender's pairwise reward model and the reference's default judge, in raw PyTorch.

A DeBERTa-v2 encoder reads a prompt x and completions A, B in one row (right-padded, <= 2048 tokens), each segment
tokenized on its own: [CLS] <|source|> x [SEP] [CLS] <|candidate1|> A [SEP] [CLS] <|candidate2|> B [SEP]. The source is
cut to 1224 tokens, each completion to 412 + (1224 - longest source of its group of 8 prompts) // 2 (llm-blender's
batches). With h the last hidden states at the three prefix tokens and head = Linear(2H -> H) -> tanh -> Linear(H -> 1):

    logit(A, B) = head([h_x; h_A]) - head([h_x; h_B])
    s = (logit(A, B) - logit(B, A)) / 2,    P(A better than B) = sigmoid(2 s / temperature)

Both orders are scored: a position preference cancels, and swapping A and B negates s. A literal "[SEP]" in a text
becomes a space (as in llm-blender); a prefix token typed in a text is dropped: scores are read at those tokens."""

import math
import re
from dataclasses import dataclass

import tokenizers
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .checkpoint import SafetensorsFile, resolve
from .common import error_line, read_json
from .judges import PairwiseJudge, prompt_text
from .model import Linear  # nn.Linear, through oneDNN for fp32 on CPU

SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
GROUP = 8  # prompts per truncation group: llm-blender's batch size, which sets the candidates' budget
BIAS_BUDGET = 2**27  # elements of one forward's [rows, heads, N, N] attention bias: 512 MB in fp32, 3x at peak


@dataclass
class EncoderConfig:
    """A DeBERTa-v2 encoder; the defaults are DeBERTa-v3's, which PairRM's own config.json leaves out."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    position_buckets: int = 256  # <= 0: relative distances as they are, clamped to max_relative_positions
    max_relative_positions: int = 512
    share_att_key: bool = True  # the position terms reuse the content query/key projections
    norm_rel_ebd: bool = True  # LayerNorm on the relative position embeddings
    layer_norm_eps: float = 1e-7

    @property
    def span(self) -> int:  # relative embeddings cover distances [-span, span)
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions


def log_bucket(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's relative position buckets: distances within ±buckets/2 kept, farther ones mapped
    to mid + ceil(log(|d| / mid) / log((max_position - 1) / mid) * (mid - 1)), sign kept, mid = buckets/2.
    In float32 as in DeBERTa, so that each bucket edge falls where it does there."""
    mid = buckets // 2
    far = rel.abs().clamp(min=mid)  # |d| <= mid keeps d itself; the clamp only keeps log() finite
    log_pos = torch.ceil(torch.log(far / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(rel.abs() <= mid, rel, (log_pos * rel.sign()).long())


class Layer(nn.Module):
    """A post-norm encoder layer: x = LayerNorm(x + attention(x)), then LayerNorm(x + W2 gelu(W1 x)) (exact-erf
    GELU), with disentangled attention:

        score(i, j) = (q_i·k_j + q_i·K_r(i,j) + k_j·Q_r(i,j)) / sqrt(3 · head_dim)

    r(i, j) the relative index of i - j, K and Q the key and query projections of the relative embeddings
    (content->position and position->content terms; the pos_* projections when share_att_key is off)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        H, self.cfg = cfg.hidden_size, cfg
        self.query_proj, self.key_proj, self.value_proj, self.attention_out = (Linear(H, H) for _ in range(4))
        if not cfg.share_att_key:
            self.pos_key_proj, self.pos_query_proj = Linear(H, H), Linear(H, H)
        self.attention_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.up, self.down = Linear(H, cfg.intermediate_size), Linear(cfg.intermediate_size, H)
        self.norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)

    def heads(self, x):  # [..., n, H] -> [..., heads, n, head_dim]
        return x.view(*x.shape[:-1], self.cfg.num_heads, -1).transpose(-2, -3)

    def forward(self, x, rel, index, key_bias):
        R, N, H = x.shape
        cfg = self.cfg
        q, k, v = self.heads(self.query_proj(x)), self.heads(self.key_proj(x)), self.heads(self.value_proj(x))
        scale = (3 * H // cfg.num_heads) ** -0.5
        pos_key = self.heads((self.key_proj if cfg.share_att_key else self.pos_key_proj)(rel))  # [heads, 2span, d]
        pos_query = self.heads((self.query_proj if cfg.share_att_key else self.pos_query_proj)(rel))
        c2p = (q @ pos_key.transpose(-1, -2)).gather(-1, index.expand(R, cfg.num_heads, N, N))
        # [j, i] = k_j · Q_r(i,j): gathered along the key's rows, then transposed to [i, j]
        p2c = (k @ pos_query.transpose(-1, -2)).gather(-1, index.T.expand(R, cfg.num_heads, N, N)).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias + (c2p + p2c) * scale, scale=scale)
        x = self.attention_norm(x + self.attention_out(out.transpose(1, 2).reshape(R, N, H)))
        return self.norm(x + self.down(F.gelu(self.up(x))))


class PairRM(nn.Module):
    """The encoder (word embeddings and LayerNorm, no absolute positions or token types) and the head."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        H, self.cfg = cfg.hidden_size, cfg
        self.embed, self.embed_norm = nn.Embedding(cfg.vocab_size, H), nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.rel_embed = nn.Embedding(2 * cfg.span, H)
        self.rel_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps) if cfg.norm_rel_ebd else nn.Identity()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Sequential(Linear(2 * H, H), nn.Tanh(), Linear(H, 1))

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[R, N, H] last hidden states of ids [R, N]; rows padded where mask is 0 (those states are
        meaningless: padding is masked as a key only)."""
        x = self.embed_norm(self.embed(ids))
        key_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, -math.inf)
        pos = torch.arange(ids.shape[1], device=ids.device)
        distance, cfg = pos[:, None] - pos[None, :], self.cfg  # [N, N]: i - j for query i and key j
        if cfg.position_buckets > 0:
            distance = log_bucket(distance, cfg.position_buckets, cfg.max_relative_positions)
        index = (distance + cfg.span).clamp(0, 2 * cfg.span - 1)  # its row of the relative embeddings
        rel = self.rel_norm(self.rel_embed.weight)
        for layer in self.layers:
            x = layer(x, rel, index, key_bias[:, None, None, :])
        return x

    def forward(self, ids, mask, positions) -> torch.Tensor:
        """[R] logit(first, second) of each row, its source and candidates' prefix tokens at positions [R, 3]."""
        h = self.encode(ids, mask)
        source, first, second = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1])).unbind(1)
        return (self.head(torch.cat([source, first], -1)) - self.head(torch.cat([source, second], -1)))[:, 0]


# Loading: PairRM's files (keys pretrained_model.* and head_layer.{1,4}.*) in either layout.

# Our module names -> theirs; head_layer is Sequential(Dropout, Linear, Tanh, Dropout, Linear).
TOP_NAMES = {"embed": "pretrained_model.embeddings.word_embeddings", "embed_norm": "pretrained_model.embeddings.LayerNorm",
             "rel_embed": "pretrained_model.encoder.rel_embeddings", "rel_norm": "pretrained_model.encoder.LayerNorm",
             "head.0": "head_layer.1", "head.2": "head_layer.4"}
LAYER_NAMES = {"attention_out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
               "up": "intermediate.dense", "down": "output.dense", "norm": "output.LayerNorm"}  # else attention.self.*


def hf_name(ours: str) -> str:
    module, param = ours.rsplit(".", 1)
    if layer := re.fullmatch(r"layers\.(\d+)\.(.+)", module):
        i, module = layer.groups()
        theirs = LAYER_NAMES.get(module, f"attention.self.{module}")
        return f"pretrained_model.encoder.layer.{i}.{theirs}.{param}"
    return f"{TOP_NAMES[module]}.{param}"


ONLY = {  # DeBERTa-v2 options with the one value supported, DeBERTa-v3's: key -> (transformers' default, value)
    "relative_attention": (False, True), "position_biased_input": (True, False), "type_vocab_size": (0, 0),
    "conv_kernel_size": (0, 0), "hidden_act": ("gelu", "gelu"), "pos_att_type": (None, ["c2p", "p2c"])}


def encoder_config(config: dict, shapes: dict, where) -> EncoderConfig:
    """The encoder's settings from a DebertaV2PairRM config.json (PairRM-hf), or DeBERTa-v3's for
    llm-blender's layout, whose config.json is the ranker's; the sizes from the weights."""
    ranker = config.get("ranker_type") == "pairranker"
    if not ranker and "DebertaV2PairRM" not in (config.get("architectures") or []):
        raise ValueError(f"{where}/config.json is neither llm-blender's pairranker config nor a DebertaV2PairRM "
                         "config: not a PairRM directory")
    try:
        vocab_size, hidden_size = shapes["pretrained_model.embeddings.word_embeddings.weight"]
        intermediate_size = shapes["pretrained_model.encoder.layer.0.intermediate.dense.weight"][0]
    except KeyError as e:
        raise ValueError(f"{where}: the weights have no {e.args[0]}: not a PairRM model") from None
    sizes = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_layers=len({n.split(".")[3] for n in shapes if n.startswith("pretrained_model.encoder.layer.")}))
    if ranker:
        return EncoderConfig(**sizes, num_heads=hidden_size // 64)  # DeBERTa-v3's heads are 64 wide
    types = config.get("pos_att_type") or []
    types = types.lower().split("|") if isinstance(types, str) else types
    config = {**config, "pos_att_type": sorted(t.strip() for t in types)}
    for key, (default, needed) in ONLY.items():
        if config.get(key, default) != needed:
            raise ValueError(f"{where}/config.json: {key}={config.get(key, default)!r} is not supported (PairRM has {needed!r})")
    max_relative = config.get("max_relative_positions", -1)
    return EncoderConfig(
        **sizes, num_heads=config.get("num_attention_heads", 12), position_buckets=config.get("position_buckets", -1),
        max_relative_positions=max_relative if max_relative >= 1 else config.get("max_position_embeddings", 512),
        share_att_key=config.get("share_att_key", False),
        norm_rel_ebd="layer_norm" in str(config.get("norm_rel_ebd", "none")), layer_norm_eps=config.get("layer_norm_eps", 1e-7))


def load_pair_rm(path, dtype=None, device=None) -> tuple[PairRM, dict]:
    """(model, config.json) from a PairRM directory, weights converted to dtype (default float32)."""
    config = read_json(path / "config.json")
    weights = SafetensorsFile(path / "model.safetensors")  # PairRM's one file; never a pickle
    shapes = {name: shape for name, (_, shape, _) in weights.entries.items()}
    with torch.device("meta"):
        model = PairRM(encoder_config(config, shapes, path))
    state = {}
    for ours, param in model.state_dict().items():
        theirs = hf_name(ours)
        if shapes.get(theirs) != param.shape:
            found = f"has shape {shapes[theirs]}" if theirs in shapes else "is missing"
            raise ValueError(f"{path}: tensor {theirs} {found}; expected {tuple(param.shape)}")
        state[ours] = weights.read(theirs).to(device=device, dtype=dtype or torch.float32)
    model.load_state_dict(state, assign=True)
    return model.eval(), config


class PairRMJudge(PairwiseJudge):
    """PairRM as TRL 1.0's PairRMJudge: judge() gives, per prompt, the index of the better completion (0 on an exact
    tie, as there), or with return_scores P(A better than B) as above. Both orders scored: shuffle_order is moot."""

    def __init__(self, model: PairRM, tokenizer: tokenizers.Tokenizer, source_max_length: int = 1224,
                 candidate_max_length: int = 412):
        self.ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE)}
        for token, i in self.ids.items():
            if i is None or i >= model.cfg.vocab_size:  # absent, or past the model's embeddings
                raise ValueError(f"the tokenizer has no {token} token the model embeds: not PairRM's tokenizer")
        self.prefix_ids = {self.ids[t] for t in (SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE)}
        self.model, self.tokenizer = model, tokenizer
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length

    @classmethod
    def from_pretrained(cls, path: str = "llm-blender/PairRM", device=None, dtype=None) -> "PairRMJudge":
        """From a local directory or a Hub repo (only safetensors, JSON and tokenizer files fetched)."""
        path = resolve(path)
        model, config = load_pair_rm(path, dtype=dtype, device=device)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # missing, or not a tokenizers file
            raise ValueError(f"{path / 'tokenizer.json'}: no PairRM tokenizer ({error_line(e)})") from None
        return cls(model, tokenizer, config.get("source_maxlength") or 1224, config.get("candidate_maxlength") or 412)

    def segment(self, prefix: str, text: str, limit: int) -> list[int]:
        """[CLS] prefix text [SEP], at most `limit` tokens: the text cut at its end."""
        ids = self.tokenizer.encode(prefix + text.replace("[SEP]", " "), add_special_tokens=False).ids
        body = [i for i in ids if i not in self.prefix_ids]  # the prefix itself and any typed inside the text
        return [self.ids["[CLS]"], self.ids[prefix]] + body[:max(limit - 3, 0)] + [self.ids["[SEP]"]]

    def group(self, prompts, completion_pairs):
        """ids, mask [2n, N] and prefix tokens' positions [2n, 3] for n <= 8 prompts: rows (A, B), then (B, A)."""
        sources = [self.segment(SOURCE, p, self.source_max_length) for p in prompts]
        limit = self.candidate_max_length + (self.source_max_length - max(map(len, sources))) // 2
        bodies = [[self.segment(CANDIDATE, c, limit)[2:] for c in pair] for pair in completion_pairs]  # text + [SEP]
        cls, rows, positions = self.ids["[CLS]"], [], []
        for source, (first, second) in [*zip(sources, bodies), *zip(sources, [pair[::-1] for pair in bodies])]:
            rows.append(source + [cls, self.ids[CANDIDATE1]] + first + [cls, self.ids[CANDIDATE2]] + second)
            positions.append([1, len(source) + 1, len(source) + len(first) + 3])
        ids = pad_sequence([torch.tensor(row) for row in rows], batch_first=True, padding_value=self.ids["[PAD]"])
        mask = pad_sequence([torch.ones(len(row), dtype=torch.long) for row in rows], batch_first=True)
        return ids, mask, torch.tensor(positions)

    @torch.inference_mode()
    def preferences(self, prompts: list[str], completion_pairs) -> torch.Tensor:
        """[n] s of each pair: positive when its first completion is the better one."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), GROUP):
            ids, mask, positions = self.group(prompts[start:start + GROUP], completion_pairs[start:start + GROUP])
            rows = max(1, BIAS_BUDGET // (self.model.cfg.num_heads * ids.shape[1] ** 2))
            logits = torch.cat([self.model(*(t.to(device) for t in chunk)).float().cpu()
                                for chunk in zip(ids.split(rows), mask.split(rows), positions.split(rows))])
            out.append((logits[:len(ids) // 2] - logits[len(ids) // 2:]) / 2)
        return torch.cat(out or [torch.zeros(0)])

    def judge(self, prompts, completion_pairs, shuffle_order=True, return_scores=False, temperature=1.0):
        s = self.preferences([prompt_text(p) for p in prompts], completion_pairs)
        return torch.sigmoid(2 * s / temperature).tolist() if return_scores else (s < 0).long().tolist()
