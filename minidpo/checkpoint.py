"""Hugging Face checkpoints in and out: config.json mapping, safetensors load and save, Hub download.

The model fuses q/k/v and the SwiGLU gate/up projections (see model.py); the files keep HF's separate tensors.
tensor_plan is the one place the two namings meet, both ways. Only safetensors are read: nothing is ever unpickled."""

import itertools
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import ModelConfig, Transformer, rope_inv_freq
from .common import (COUNT, FLAG, NUMBER, OBJECT, SIZE, TEXT, TOKEN_IDS, building_beside, check_keys, error_line,
                     hub_snapshot, read_json, replace_dir, write_json)
from .tokenizer import Tokenizer, read_generation_config

# Architecture prefix -> family, each with a causal LM and a sequence-classification (reward) head; Gemma 3's
# LM also loads from Gemma3ForConditionalGeneration (vision tower skipped), saved back as Gemma3ForCausalLM.
FAMILY_PREFIXES = {"Llama": "llama", "Qwen2": "qwen2", "GPTNeoX": "gpt_neox", "Qwen3": "qwen3", "Mistral": "mistral",
                   "Gemma2": "gemma2", "Gemma3": "gemma3", "Phi3": "phi3", "Olmo2": "olmo2", "SmolLM3": "smollm3"}
FAMILIES = {f"{prefix}For{head}": family for prefix, family in FAMILY_PREFIXES.items()
            for head in ("CausalLM", "SequenceClassification")}
FAMILIES |= {"Gemma3ForConditionalGeneration": "gemma3", "Gemma3TextForSequenceClassification": "gemma3"}
GEMMA = dict(norm_layout="sandwich", norm_offset=1.0, norm_weight_fp32=True, embed_scale=True)
# What a family switches on beyond Llama's layout (the rest is read from config.json).
SWITCHES = {"gpt_neox": dict(layer_norm=True, gated_mlp=False), "qwen3": dict(qk_norm="head"), "gemma2": GEMMA,
            "gemma3": dict(GEMMA, qk_norm="head"),
            "olmo2": dict(norm_layout="post", norm_weight_fp32=True, qk_norm="proj", rope_fp32=True)}
# Gemma3TextConfig's defaults: a Gemma3ForConditionalGeneration config.json from the Hub leaves them out.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                            rope_theta=1e6, rope_local_base_freq=1e4, tie_word_embeddings=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a Hub download fetches: weights, configs and tokenizer files, never pickles.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*"]
# The config.json keys minidpo reads, and what each must be.
CONFIG_KEYS = {
    "architectures": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v)),
    **dict.fromkeys(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "num_labels"], SIZE),
    **dict.fromkeys(["rope_theta", "rotary_emb_base", "partial_rotary_factor", "rotary_pct", "rms_norm_eps",
                     "layer_norm_eps"], NUMBER),
    **dict.fromkeys(["use_sliding_window", "tie_word_embeddings", "attention_bias", "mlp_bias",
                     "use_parallel_residual"], FLAG),
    **dict.fromkeys(["rope_parameters", "rope_scaling", "id2label"], OBJECT),
    "hidden_act": TEXT, "eos_token_id": TOKEN_IDS, "bos_token_id": COUNT, "pad_token_id": COUNT}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a config.json of transformers 4 (rope_theta, rope_scaling, rotary_pct, rope_local_base_freq)
    or 5 (rope_parameters, per layer type for Gemma 3, partial_rotary_factor)."""
    arch = (hf.get("architectures") or ["?"])[0]
    family = FAMILIES.get(arch)
    if family is None:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILY_PREFIXES)} (ForCausalLM "
                         "and ForSequenceClassification); mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE) "
                         "are not supported")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3 in transformers 5: one set per layer type
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    neox = family == "gpt_neox"  # its transformers-4 names and defaults: rotary_emb_base, rotary_pct 0.25
    partial = rope.get("partial_rotary_factor",
                       hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25 if neox else 1.0)))
    rope_layers = None
    if family == "smollm3":  # 0: no rotary in that layer; by default every no_rope_layer_interval-th
        every = hf.get("no_rope_layer_interval", 4)
        rope_layers = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(layers)]
    classifier = arch.endswith("ForSequenceClassification")
    # Qwen2, Qwen3 and SmolLM3 keep a sliding_window value that applies only with use_sliding_window.
    windowed = family not in ("qwen2", "qwen3", "smollm3") or hf.get("use_sliding_window")
    bias = hf.get("attention_bias", neox or family == "qwen2")  # Qwen2: on q/k/v, never on the output
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        rotary_dim=int(head_dim * partial),
        rope_scaling={**scaling, "rope_type": rope_type} if rope_type != "default" else None,
        activation=hf.get("hidden_activation") or hf.get("hidden_act", "gelu" if neox else "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        # transformers stores the label count as id2label; a bare config means its default of 2.
        num_labels=(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2) if classifier else 0,
        attn_scale=hf["query_pre_attn_scalar"] ** -0.5 if hf.get("query_pre_attn_scalar") else None,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=None if classifier else hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window") if windowed else None,
        layer_types=layer_types(hf, family, rope_layers),
        local_rope_theta=(local_rope.get("rope_theta", hf.get("rope_local_base_freq", 1e4))
                          if family == "gemma3" else None),
        norm_eps=hf.get("layer_norm_eps", 1e-5) if neox else hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bias, out_bias=bias and family != "qwen2", mlp_bias=neox or hf.get("mlp_bias", False),
        parallel_residual=neox and hf.get("use_parallel_residual", True),
        rope_layers=rope_layers, **SWITCHES.get(family, {}))


def layer_types(hf: dict, family: str, rope_layers) -> list[str] | None:
    """Which layers are local ("sliding_attention"), as transformers decides it: config.json's
    layer_types, or (a transformers-4 config) the family's rule. Mistral and Phi-3 window every layer."""
    n = hf["num_hidden_layers"]
    if family in ("mistral", "phi3"):
        return ["sliding_attention"] * n
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    rules = {"gemma2": lambda i: (i + 1) % 2, "gemma3": lambda i: (i + 1) % hf.get("sliding_window_pattern", 6),
             "qwen2": lambda i: i >= hf.get("max_window_layers", 28), "smollm3": lambda i: not rope_layers[i]}
    rules["qwen3"] = rules["qwen2"]
    local = rules.get(family)
    return None if local is None else ["sliding_attention" if local(i) else "full_attention" for i in range(n)]


def language_model_config(hf: dict) -> dict:
    """A Gemma 3 vision-language config.json -> its language model's, as a Gemma3ForCausalLM (or, for
    a reward model, Gemma3TextForSequenceClassification) config; any other config as it is."""
    if "text_config" not in hf:
        return hf
    arch = hf["architectures"][0]
    head = "Gemma3TextForSequenceClassification" if arch.endswith("Classification") else "Gemma3ForCausalLM"
    kept = {k: hf[k] for k in ("num_labels", "id2label", "label2id", "pad_token_id", "eos_token_id",
                               "tie_word_embeddings") if k in hf}
    return {**GEMMA3_TEXT_DEFAULTS, **hf["text_config"], **kept, "architectures": [head], "model_type": "gemma3_text"}


def tensor_plan(hf: dict, cfg: ModelConfig) -> dict[str, list[str]]:
    """minidpo parameter name -> the HF tensor names it is made of (concatenated along dim 0). GPT-NeoX's
    query_key_value is interleaved per head (neox_qkv reorders it); only its LayerNorms have a bias."""
    names = HF_NAMES.get(FAMILIES[hf["architectures"][0]], LLAMA_NAMES)
    classifier = cfg.num_labels > 0
    plan = {}

    def add(ours, theirs, bias):
        for kind in ("weight", "bias") if bias else ("weight",):
            plan[f"{ours}.{kind}"] = [f"{t}.{kind}" for t in theirs]

    add("embed", [names["embed"]], False)
    add("norm", [names["norm"]], cfg.layer_norm)
    if not classifier and not cfg.tie_word_embeddings:
        add("lm_head", [names["lm_head"]], False)
    biases = {"attn.qkv": cfg.qkv_bias, "attn.out": cfg.out_bias, "mlp.up": cfg.mlp_bias, "mlp.down": cfg.mlp_bias}
    for i in range(cfg.num_layers):
        src, dst = f"{names['layers']}.{i}.", f"layers.{i}."
        for ours, theirs in NORMS[cfg.norm_layout].items():
            add(dst + ours, [src + theirs], cfg.layer_norm)
        for norm in ("q_norm", "k_norm") if cfg.qk_norm else ():
            add(f"{dst}attn.{norm}", [f"{src}self_attn.{norm}"], False)
        for ours, bias in biases.items():
            add(dst + ours, [src + t for t in names[ours]], bias)
    if classifier:
        add("score", ["score"], False)
    return plan


# Block norms, ours -> HF's, for each ModelConfig.norm_layout.
NORMS = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
    "post": {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}}
# HF's names of our other tensors (in a layer: after "{layers}.{i}."), Llama's and those that differ.
# The lists are what our fused q/k/v and gate/up are made of; Phi-3 stores them fused already.
LLAMA_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head", "layers": "model.layers",
               "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "attn.out": ["self_attn.o_proj"], "mlp.up": ["mlp.gate_proj", "mlp.up_proj"],
               "mlp.down": ["mlp.down_proj"]}
HF_NAMES = {
    "phi3": LLAMA_NAMES | {"attn.qkv": ["self_attn.qkv_proj"], "mlp.up": ["mlp.gate_up_proj"]},
    "gpt_neox": {"embed": "gpt_neox.embed_in", "norm": "gpt_neox.final_layer_norm", "lm_head": "embed_out",
                 "layers": "gpt_neox.layers", "attn.qkv": ["attention.query_key_value"],
                 "attn.out": ["attention.dense"], "mlp.up": ["mlp.dense_h_to_4h"], "mlp.down": ["mlp.dense_4h_to_h"]}}


def stored_name(name: str, stored) -> str:
    """An HF tensor name as the files hold it: as it is, or where a Gemma 3 vision-language checkpoint keeps
    its LM (transformers 4 and 5 save "language_model.model.*", the class holds "model.language_model.*")."""
    candidates = (name, "language_model." + name, name.replace("model.", "model.language_model.", 1))
    return next((candidate for candidate in candidates if candidate in stored), name)


def is_neox_qkv(hf: dict, name: str) -> bool:
    return FAMILIES[hf["architectures"][0]] == "gpt_neox" and ".attn.qkv." in name


def neox_qkv(t: torch.Tensor, num_heads: int, to_hf: bool = False) -> torch.Tensor:
    # GPT-NeoX lays out query_key_value's outputs as [head, (q|k|v), head_dim], ours as [(q|k|v), head, head_dim];
    # to_hf turns ours into theirs. Same for the bias (a 1-D tensor).
    rest, rows = t.shape[1:], (3, num_heads) if to_hf else (num_heads, 3)
    return t.reshape(*rows, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        for name in weight_map.values():
            # Untrusted: a name like "../x" or "/x" must not make us read outside the model directory.
            # Plain names, not resolved paths: the Hub cache's files are symlinks into its blobs.
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise ValueError(f"{index}: weight_map names {json.dumps(name)[:60]}, not a file in {path}")
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in [*path.glob("*.bin"), *path.glob("*.pt")]]
        hint = (f" (found {', '.join(pickles)}: minidpo never unpickles; convert once with transformers: "
                "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))") if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    return files


def resolve(name_or_path: str) -> Path:
    """A local directory as it is; the offline SmolLM2 by its name; anything else is a Hub repo id."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if name_or_path.startswith("offline:"):
        from .gguf_import import OFFLINE_MODEL, offline_model_dir

        if name_or_path != OFFLINE_MODEL:
            raise FileNotFoundError(f"unknown offline model {name_or_path!r}; there is {OFFLINE_MODEL!r}")
        return offline_model_dir()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path} is not a model directory")
    return hub_snapshot(name_or_path, repr(name_or_path), allow_patterns=HUB_PATTERNS)


def as_classifier(hf: dict, num_labels: int) -> dict:
    """The config of a *ForSequenceClassification model with the same body as a *ForCausalLM one."""
    arch = hf["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    arch = arch.replace("Gemma3For", "Gemma3TextFor")  # Gemma3ForSequenceClassification wants the vision config
    eos = hf.get("eos_token_id")
    labels = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    return {**hf, "architectures": [arch], "num_labels": num_labels, "id2label": labels,
            "label2id": {v: int(k) for k, v in labels.items()},
            # transformers finds each row's last token through pad_token_id, so it must be set.
            "pad_token_id": hf.get("pad_token_id", eos[0] if isinstance(eos, list) else eos)}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """A .safetensors file, read with plain file reads into tensors this process owns. The format: the header's
    length (8 bytes, little-endian), a JSON header mapping each name to {"dtype", "shape", "data_offsets":
    [begin, end]} (bytes after the header), then the data. safetensors' safe_open memory-maps it instead, and
    the pages read to build the fused q/k/v and gate/up stay resident beside the fused copies while any tensor
    aliases them (~280 MB for SmolLM2-135M, twice over for a policy and its reference); read, they are held once."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if size < 8 + header_len:
                    raise ValueError(f"it has {size} bytes, too few for a header of {header_len}")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            header.pop("__metadata__", None)
            self.data_start, self.entries, spans = 8 + header_len, {}, []
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
                (begin, end), shape = entry["data_offsets"], tuple(entry["shape"])
                nbytes = math.prod(shape) * dtype.itemsize
                if min([begin, *shape]) < 0 or end - begin != nbytes or self.data_start + end > size:
                    raise ValueError(f"tensor {name}'s bytes [{begin}, {end}) do not fit its shape {shape} "
                                     f"or lie past the end of the file (truncated?)")
                self.entries[name] = (dtype, shape, begin)
                spans.append((begin, end, name))
            # As safetensors itself: no two tensors may share bytes.
            for (_, end, first), (begin, _, second) in itertools.pairwise(sorted(spans)):
                if begin < end:
                    raise ValueError(f"tensors {first} and {second} overlap")
        except Exception as e:  # missing, truncated, or not safetensors: loaders say no more than this
            raise ValueError(f"{path} is not a readable safetensors file ({error_line(e)})") from None

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())  # the file is little-endian, as are x86 and ARM
        return tensor


def load_model(name_or_path: str, dtype=None, device=None, num_labels: int | None = None) -> Transformer:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files, converted
    to `dtype` (default float32) on `device`: peak memory stays about one copy. num_labels turns a causal LM
    into a reward model: the same body, a new `score` head (normal with std 0.02, as transformers initialises)."""
    path = resolve(name_or_path)
    hf = language_model_config(check_keys(read_json(path / "config.json"), CONFIG_KEYS, path / "config.json"))
    new_head = num_labels is not None and (hf.get("architectures") or [""])[0].endswith("ForCausalLM")
    if new_head:
        hf = as_classifier(hf, num_labels)
    try:
        cfg = model_config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} has no {e.args[0]!r}") from None
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    where = {name: r for r in map(SafetensorsFile, safetensors_files(path)) for name in r.entries}
    # Before anything is built: a config.json claiming millions of layers would take minutes to
    # build even on the meta device. Every other size is checked against its tensor's shape below.
    layers = {int(m.group(1)) for name in where if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", name))}
    if len(layers) != cfg.num_layers:
        raise ValueError(f"{path / 'config.json'}: num_hidden_layers is {cfg.num_layers}, but the safetensors "
                         f"files hold {len(layers)} layers")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    plan = tensor_plan(hf, cfg)
    state = {}
    if new_head:
        del plan["score.weight"]
        state["score.weight"] = torch.randn(expected["score.weight"].shape, dtype=dtype, device=device) * 0.02
    for ours, theirs in plan.items():
        theirs = [stored_name(t, where) for t in theirs]
        # Each file tensor is checked against its share of ours before fusing: the error names it, not torch.cat.
        want = expected[ours].shape
        rows = split_sizes(cfg, ours) if len(theirs) > 1 else [want[0]]
        parts = []
        for name, n in zip(theirs, rows):
            if name not in where:
                raise ValueError(f"{path}: tensor {name} is missing from the safetensors files")
            dtype_in_file, shape, _ = where[name].entries[name]
            if shape != (n, *want[1:]):
                raise ValueError(f"{path}: tensor {name} has shape {tuple(shape)}, which does not fit "
                                 f"config.json (expected {(n, *want[1:])})")
            if not dtype_in_file.is_floating_point:
                raise ValueError(f"{path}: tensor {name} holds {dtype_in_file}, not floating-point weights")
            parts.append(where[name].read(name).to(device=device, dtype=dtype))
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        state[ours] = neox_qkv(tensor, cfg.num_heads) if is_neox_qkv(hf, ours) else tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device=device)  # a buffer, not in the files: still on meta
    if cfg.local_rope_theta is not None:
        model.local_inv_freq = rope_inv_freq(cfg, local=True).to(device=device)
    model.cfg.hf_config = hf
    model.cfg.generation_config = read_generation_config(path) or None  # sampling defaults, kept on save
    return model


def load_pretrained(name_or_path: str, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a local HF directory, a Hub repo id or "offline:SmolLM2-135M-Instruct"."""
    path = resolve(name_or_path)
    model, tokenizer = load_model(str(path), dtype=dtype, device=device), Tokenizer.from_dir(path)
    check_vocabulary(tokenizer, model.cfg, path)
    return model, tokenizer


def check_vocabulary(tokenizer, cfg: ModelConfig, path):
    """The model must have an embedding row for every token id; more rows than tokens is common
    (vocabularies padded to a multiple of 64 or 128 for faster matmuls)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size of {cfg.vocab_size} in config.json")


def hf_state_dict(state: dict, cfg: ModelConfig, hf: dict) -> dict[str, torch.Tensor]:
    """A minidpo state dict under HF names, fused tensors split back."""
    out = {}
    for ours, theirs in tensor_plan(hf, cfg).items():
        tensor = neox_qkv(state[ours], cfg.num_heads, to_hf=True) if is_neox_qkv(hf, ours) else state[ours]
        sizes = split_sizes(cfg, ours) if len(theirs) > 1 else [tensor.shape[0]]
        out |= {name: part.contiguous() for name, part in zip(theirs, tensor.split(sizes))}
    return out


def split_sizes(cfg: ModelConfig, name: str) -> list[int]:
    if ".attn.qkv." in name:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]  # gate, up


def save_pretrained(model: Transformer, out_dir, tokenizer=None, max_shard_bytes: int = 5 * 2**30):
    """Write the HF layout (config.json, safetensors shards with an index above max_shard_bytes,
    generation_config.json, tokenizer files) that from_pretrained loads: built beside out_dir and renamed
    into place (common.py), so a crash leaves the previous model intact, never a half-written one."""
    out_dir = Path(out_dir)
    with building_beside(out_dir) as tmp:
        write_pretrained(model.state_dict(), model.cfg, tmp, tokenizer, max_shard_bytes)
        replace_dir(tmp, out_dir)
    return out_dir


def write_pretrained(state: dict, cfg: ModelConfig, out_dir: Path, tokenizer=None, max_shard_bytes: int = 5 * 2**30):
    """The HF files of a (full, unsharded) state dict into an existing directory; not atomic by itself."""
    tensors = hf_state_dict(state, cfg, cfg.hf_config)
    dtype_name = {v: k for k, v in DTYPES.items()}[next(iter(tensors.values())).dtype]
    hf = {**cfg.hf_config, "dtype": dtype_name, "tie_word_embeddings": cfg.tie_word_embeddings}
    if "torch_dtype" in hf:  # transformers 4's name for it
        hf["torch_dtype"] = dtype_name
    write_shards(tensors, out_dir, max_shard_bytes)
    write_json(out_dir / "config.json", hf)
    generation = dict(cfg.generation_config or {})
    if tokenizer is not None:
        tokenizer.save(out_dir)
        generation |= {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                       "eos_token_id": tokenizer.eos_token_ids}
    if generation:
        write_json(out_dir / "generation_config.json", generation)


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int):
    """model.safetensors, or shards of at most max_shard_bytes (a larger tensor alone) and their index."""
    shards = [{}]
    for name, t in tensors.items():
        if shards[-1] and sum(s.nbytes for s in shards[-1].values()) + t.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = t
    n = len(shards)
    filenames = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
    for filename, shard in zip(filenames, shards):
        save_file(shard, out / filename, metadata={"format": "pt"})
    if n > 1:
        weight_map = {name: filename for filename, shard in zip(filenames, shards) for name in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        write_json(out / "model.safetensors.index.json", index)
