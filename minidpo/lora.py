"""LoRA (Hu et al. 2021) on minidpo's own layers, saved and loaded in PEFT's file layout.

An adapted layer keeps its frozen weight W (never split or changed) and adds, to the output columns of each
adapted slice s (q_proj and v_proj of the fused q/k/v layer, say), scale * (x A_s^T) B_s^T with A_s [r, in],
B_s [rows_s, r], scale = alpha / r (rsLoRA: / sqrt(r)). B starts at zero, so training starts exactly at the base
model, which is also the reference: the same layers with the adapters off. Adapters sit beside the weights
(layers.0.attn.qkv.lora_A.q_proj); PEFT names them after the HF module (base_model.model.{module}.lora_A.weight),
and checkpoint.tensor_plan relates the two (GPT-NeoX's interleaved query_key_value: B's rows reordered).

Rollouts decode with the adapters merged into W (adapters_merged): 1.2x (q, v) to 1.5x (all linear) faster on CPU
than per-step low-rank products (bench/RESULTS.md). W is restored exactly, in place: captured CUDA graphs stay valid."""

import argparse
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .checkpoint import (DTYPES, FAMILIES, is_neox_qkv, load_pretrained, neox_qkv,
                         save_pretrained, split_sizes, tensor_plan)
from .common import error_line, print_error, read_json, write_json
from .cpu import linear
from .model import Linear, Transformer

# PEFT's default targets (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); none for Phi-3, OLMo 2, SmolLM3.
DEFAULT_TARGETS = {"gpt_neox": ["query_key_value"]} | dict.fromkeys(
    ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"], ["q_proj", "v_proj"])
ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # see add_adapters; None: PEFT's default
    rslora: bool = False
    base_model: str | None = None  # written to adapter_config.json as base_model_name_or_path


class LoraLinear(nn.Module):
    """A frozen linear layer (weight and bias under their old names) plus adapters, fp32 as PEFT's, on slices of
    its outputs: `slices` maps an HF module name (model.layers.0.self_attn.q_proj) to (first output row, rows)."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], spec: LoraSpec):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.slices = {hf.rpartition(".")[2]: (hf, start, rows) for hf, (start, rows) in slices.items()}
        self.scale = spec.alpha / (math.sqrt(spec.r) if spec.rslora else spec.r)
        self.dropout, self.enabled = spec.dropout, True
        device = base.weight.device  # A as PEFT initialises it, B zero
        self.lora_A = nn.ParameterDict({s: nn.Parameter(nn.init.kaiming_uniform_(
            torch.empty(spec.r, base.in_features, device=device), a=math.sqrt(5))) for s in self.slices})
        self.lora_B = nn.ParameterDict({s: nn.Parameter(torch.zeros(rows, spec.r, device=device))
                                        for s, (_, _, rows) in self.slices.items()})

    def forward(self, x):
        y = linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        train = self.training and torch.is_grad_enabled()  # dropout in the learning pass only
        for s, (_, start, rows) in self.slices.items():
            h = F.dropout(x, self.dropout, train).to(self.lora_A[s].dtype)
            update = F.linear(F.linear(h, self.lora_A[s]), self.lora_B[s]) * self.scale  # [..., rows_s]
            # Zero-padded to s's columns: y is not changed in place (oneDNN's linear returns a view).
            y = y + F.pad(update, (start, y.shape[-1] - start - rows)).to(y.dtype)
        return y


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_adapters(model: Transformer, spec: LoraSpec) -> Transformer:
    """Freeze the model and put fresh adapters on the linear layers spec.target_modules names (PEFT's
    matching: the HF module's name or a suffix of it after a dot; a string is a regex the whole name
    must match; "all-linear": every linear layer but the output head)."""
    hf = model.cfg.hf_config
    family = FAMILIES[hf["architectures"][0]]
    if not spec.target_modules and family not in DEFAULT_TARGETS:
        raise ValueError(f"--use_peft on a {family} model needs --lora_target_modules (e.g. all-linear): "
                         "PEFT has no default targets for this family")
    targets = spec.target_modules or DEFAULT_TARGETS[family]
    every = targets in ("all-linear", ["all-linear"])
    regex = isinstance(targets, str) and not every
    chosen = lambda name: every or (re.fullmatch(targets, name) if regex else  # noqa: E731
                                     any(name == t or name.endswith("." + t) for t in targets))

    model.requires_grad_(False)
    found = set()
    for ours, theirs in tensor_plan(hf, model.cfg).items():
        module_name = ours.removesuffix(".weight")
        if module_name == ours or module_name in ("lm_head", "score") \
                or not isinstance(module := model.get_submodule(module_name), nn.Linear):
            continue
        sizes = split_sizes(model.cfg, ours) if len(theirs) > 1 else [module.out_features]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        slices = {t.removesuffix(".weight"): (start, n) for t, start, n in zip(theirs, starts, sizes)
                  if chosen(t.removesuffix(".weight"))}
        if slices:
            model.set_submodule(module_name, LoraLinear(module, slices, spec))
            found |= {hf_name.rpartition(".")[2] for hf_name in slices}
    if not found:
        raise ValueError(f"LoRA target modules {targets} match no linear layer of this {hf['architectures'][0]} model")
    spec.target_modules = targets if regex else sorted(found)
    model.lora = spec
    return model


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration of the block: every adapter off (online DPO's reference)."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def low_rank_update(layer: LoraLinear, s: str) -> torch.Tensor:
    """scale * B_s A_s [rows_s, in], in the weight's dtype: what merging adds to slice s of W."""
    return (layer.scale * layer.lora_B[s] @ layer.lora_A[s]).to(layer.weight.dtype)


@contextmanager
def adapters_merged(model: nn.Module):
    """Adapters merged into the weights and switched off for the block (decoding at the base model's speed)."""
    saved = []
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for s, (_, start, rows) in layer.slices.items():
                weight = layer.weight[start:start + rows]
                saved.append((weight, weight.clone()))
                weight += low_rank_update(layer, s)
    try:
        with adapters_disabled(model):
            yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def adapter_names(model: Transformer):
    """(our name, PEFT's name, whether its rows are in GPT-NeoX's interleaved q/k/v order in PEFT's
    file) of every adapter tensor: A's rows are the rank, B's the adapted output rows."""
    for name, layer in lora_layers(model).items():
        neox = is_neox_qkv(model.cfg.hf_config, f"{name}.weight")
        for s, (hf_name, _, _) in layer.slices.items():
            yield f"{name}.lora_A.{s}", f"{PEFT_PREFIX}{hf_name}.lora_A.weight", False
            yield f"{name}.lora_B.{s}", f"{PEFT_PREFIX}{hf_name}.lora_B.weight", neox


def peft_tensors(state: dict, model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter tensors of a minidpo state dict (e.g. full_state_dict's) under PEFT's names."""
    return {peft: (neox_qkv(state[ours], model.cfg.num_heads, to_hf=True) if neox else state[ours]).contiguous()
            for ours, peft, neox in adapter_names(model)}


def write_adapter(state: dict, model: Transformer, out_dir: Path):
    """adapter_config.json and adapter_model.safetensors, as PEFT's save_pretrained writes them."""
    spec = model.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.base_model,
              "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
              "target_modules": spec.target_modules, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_dora": False}
    save_file(peft_tensors(state, model), out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(out_dir / ADAPTER_CONFIG, config)


def load_adapter(model: Transformer, adapter_dir) -> Transformer:
    """Put the LoRA adapter PEFT (or minidpo) saved in adapter_dir on `model`, its base model."""
    adapter_dir = Path(adapter_dir)
    c = read_json(adapter_dir / ADAPTER_CONFIG)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                               "fan_in_fan_out") if c.get(k)]
    if c.get("peft_type") != "LORA" or c.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: only plain LoRA adapters are supported (peft_type LORA, "
                         f"bias none; not {', '.join(unsupported) or c.get('peft_type')})")
    add_adapters(model, LoraSpec(c["r"], c["lora_alpha"], c.get("lora_dropout", 0.0), c.get("target_modules"),
                                 c.get("use_rslora", False), c.get("base_model_name_or_path")))
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS, device=str(model.embed.weight.device))
    names, ours = list(adapter_names(model)), model.state_dict()
    wanted = {peft for _, peft, _ in names}
    if tensors.keys() != wanted:
        odd = sorted(tensors.keys() ^ wanted)[0]
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {odd} is "
                         f"{'missing' if odd in wanted else 'unexpected'}")
    state = {}
    for name, peft, neox in names:
        t = tensors[peft]
        if t.shape != ours[name].shape:  # checked first: the reordering of GPT-NeoX's rows needs the right shape
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {peft} has shape {tuple(t.shape)}, "
                             f"which does not fit the base model's {tuple(ours[name].shape)}")
        state[name] = neox_qkv(t, model.cfg.num_heads) if neox else t
    model.load_state_dict(state, strict=False)  # copied into the fp32 adapters, whatever the file's dtype
    return model


@torch.no_grad()
def merge_adapters(model: Transformer) -> Transformer:
    """W[rows of s] += scale * B_s A_s for every adapter, each layer then a plain Linear again."""
    for name, layer in lora_layers(model).items():
        for s, (_, start, rows) in layer.slices.items():
            layer.weight[start:start + rows] += low_rank_update(layer, s)
        plain = Linear(layer.weight.shape[1], layer.weight.shape[0], bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        model.set_submodule(name, plain)
    del model.lora
    return model


def model_dtype(choice: str, model_dir: Path) -> torch.dtype:
    """--torch_dtype: float32, bfloat16, or auto (the dtype config.json names; float32 if none)."""
    if choice == "auto":
        hf = read_json(Path(model_dir) / "config.json")
        choice = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return DTYPES[choice]


def load_pretrained_or_adapter(name_or_path: str, dtype=None, device=None):
    """(model, tokenizer) of a model directory, or of an adapter directory: its base model with the
    adapter merged in (generation then runs at the base model's speed)."""
    path = Path(name_or_path)
    if not (path / ADAPTER_CONFIG).is_file():
        return load_pretrained(name_or_path, dtype, device)
    base = read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path")
    model, tokenizer = load_pretrained(base, dtype, device)
    return merge_adapters(load_adapter(model, path)), tokenizer


def main(argv=None) -> int:
    """`python -m minidpo.lora merge ADAPTER_DIR OUT_DIR`: the base model with the adapter merged in,
    written as a full Hugging Face model directory."""
    p = argparse.ArgumentParser(prog="python -m minidpo.lora", description=main.__doc__.split(":", 1)[1])
    p.add_argument("command", choices=["merge"])
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_pretrained_or_adapter(args.adapter_dir, dtype=args.torch_dtype)
        save_pretrained(model, args.out_dir, tokenizer)
    except (ValueError, OSError, KeyError) as e:
        print_error(error_line(e))
        return 1
    print(f"saved the merged model to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
