"""minidpo.checkpoint: HF config mapping, safetensors load and save, Hub resolution, errors.

transformers (dev-only) writes the checkpoints minidpo must read and reads the ones minidpo
writes; logits are compared on the same input ids throughout.
"""

import fnmatch
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minidpo
import minidpo.checkpoint as ckpt

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
IDS = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=0):
    """Random weights everywhere, biases and norms included (transformers would leave them 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def make(path, config, cls, seed=0, **save_kwargs):
    ref = randomize(cls(config), seed)
    ref.save_pretrained(path, **save_kwargs)
    return ref


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def llama(**kw):
    return T.LlamaConfig(**COMMON, num_key_value_heads=2, **kw)


def tensor_names(path):
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


def raises_one_line(exc_type, fn, *needles):
    """fn() raises exc_type with a one-line message containing every needle; returns the message."""
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


# ---------------------------------------------------------------------------------------------
# Loading


def test_sharded_load_equals_single_file(tmp_path):
    ref = make(tmp_path / "single", llama(), T.LlamaForCausalLM)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # q/k/v of one layer land in different shards
    single = minidpo.load_model(str(tmp_path / "single"))
    sharded = minidpo.load_model(str(tmp_path / "sharded"))
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(single), logits(sharded))
    assert (logits(single) - logits(ref)).abs().max().item() <= 1e-4


def test_tied_embeddings_need_no_lm_head(tmp_path):
    ref = make(tmp_path, T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True), T.Qwen2ForCausalLM)
    assert "lm_head.weight" not in tensor_names(tmp_path)
    model = minidpo.load_model(str(tmp_path))
    assert not hasattr(model, "lm_head")
    assert (logits(model) - logits(ref)).abs().max().item() <= 1e-4


def test_untied_embeddings_use_lm_head(tmp_path):
    ref = make(tmp_path, llama(tie_word_embeddings=False), T.LlamaForCausalLM)
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    model = minidpo.load_model(str(tmp_path))
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert (logits(model) - logits(ref)).abs().max().item() <= 1e-4
    # ... and it is required.
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tmp_path)), "lm_head.weight", "missing")


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bf16_load(tmp_path, dtype):
    ref = make(tmp_path, llama(attention_bias=True), T.LlamaForCausalLM)
    model = minidpo.load_model(str(tmp_path), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The values are the fp32 weights rounded to bf16 (q/k/v fused in our layout).
    attn = ref.model.layers[1].self_attn
    fused = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).to(torch.bfloat16)
    assert torch.equal(model.layers[1].attn.qkv.bias, fused)
    assert logits(model).dtype == torch.bfloat16


# Hand-written transformers-4 spellings of the configs transformers 5 writes. Each edit maps the
# v5 keys (rope_parameters, partial_rotary_factor inside it, dtype) to their v4 names.
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def v4_rope(key):
    def edit(hf):
        rope = hf.pop("rope_parameters")
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = {key: rope.pop("rope_type"), **rope}
        return hf
    return edit


def v4_theta(hf):
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]
    return hf


def v4_neox(hf):
    rope = hf.pop("rope_parameters")
    hf["rotary_emb_base"] = rope["rope_theta"]
    hf["rotary_pct"] = rope["partial_rotary_factor"]
    return hf


SPELLINGS = {
    "llama3_type": (llama(rope_theta=500.0, rope_scaling={"rope_type": "llama3", **LLAMA3}),
                    T.LlamaForCausalLM, v4_rope("type")),
    "llama3_rope_type": (llama(rope_theta=500.0, rope_scaling={"rope_type": "llama3", **LLAMA3}),
                         T.LlamaForCausalLM, v4_rope("rope_type")),
    "linear_type": (llama(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                    T.LlamaForCausalLM, v4_rope("type")),
    "qwen2_theta": (T.Qwen2Config(**COMMON, num_key_value_heads=2, rope_theta=500.0),
                    T.Qwen2ForCausalLM, v4_theta),
    # rotary_emb_base != 10000 and rotary_pct 0.5: neither may fall back to a default unnoticed.
    "neox": (T.GPTNeoXConfig(**COMMON, rotary_pct=0.5, rotary_emb_base=500.0), T.GPTNeoXForCausalLM, v4_neox),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_config_spellings_v4_and_v5_agree(tmp_path, name):
    config, cls, to_v4 = SPELLINGS[name]
    v5, v4 = tmp_path / "v5", tmp_path / "v4"
    ref = make(v5, config, cls)
    shutil.copytree(v5, v4)
    hf = json.loads((v5 / "config.json").read_text())
    assert "rope_parameters" in hf and "dtype" in hf  # transformers 5 wrote the new spelling
    hf = to_v4(hf)
    hf["torch_dtype"] = hf.pop("dtype")
    assert "rope_parameters" not in hf
    (v4 / "config.json").write_text(json.dumps(hf))

    ours_v5 = logits(minidpo.load_model(str(v5)))
    ours_v4 = logits(minidpo.load_model(str(v4)))
    assert torch.equal(ours_v4, ours_v5)
    assert (ours_v5 - logits(ref)).abs().max().item() <= 1e-4
    # transformers reads the v4 file the same way (an independent check of the edit itself).
    assert (ours_v4 - logits(cls.from_pretrained(v4).eval())).abs().max().item() <= 1e-4
    # The rope settings matter for these inputs: the defaults give other logits.
    hf.pop("rope_scaling", None), hf.pop("rope_theta", None), hf.pop("rotary_emb_base", None)
    (v4 / "config.json").write_text(json.dumps(hf))
    assert (logits(minidpo.load_model(str(v4))) - ours_v5).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------
# Saving

SAVE_CASES = {
    "llama": (llama(attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "llama3", **LLAMA3}),
              T.LlamaForCausalLM),
    "qwen2_tied": (T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True), T.Qwen2ForCausalLM),
    "neox": (T.GPTNeoXConfig(**COMMON, rotary_pct=0.25), T.GPTNeoXForCausalLM),
    "llama_reward": (llama(num_labels=1, pad_token_id=0), T.LlamaForSequenceClassification),
}


def check_index(out):
    """A valid index: every file it names exists and holds exactly the tensors mapped to it."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    by_file = {}
    for name, f in index["weight_map"].items():
        by_file.setdefault(f, set()).add(name)
    assert len(by_file) > 1
    assert {p.name for p in out.glob("*.safetensors")} == set(by_file)
    total = 0
    for f, names in by_file.items():
        with safe_open(out / f, "pt") as h:
            assert set(h.keys()) == names
            total += sum(h.get_tensor(n).numel() * h.get_tensor(n).element_size() for n in names)
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("name", list(SAVE_CASES))
def test_save_then_transformers_loads_same_logits(tmp_path, name):
    config, cls = SAVE_CASES[name]
    ref = make(tmp_path / "src", config, cls)
    model = minidpo.load_model(str(tmp_path / "src"))
    out = minidpo.save_pretrained(model, tmp_path / "out", tokenizer=None, max_shard_bytes=40_000)
    assert out == tmp_path / "out"
    check_index(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left behind
    back = cls.from_pretrained(out).eval()
    # The same tensors under the same names (fused ones split back, NeoX's qkv re-interleaved) ...
    a, b = ref.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # ... hence the same logits, from transformers and from minidpo reading its own output.
    assert torch.equal(logits(back), logits(ref))
    assert torch.equal(logits(minidpo.load_model(str(out))), logits(model))


def test_save_bf16(tmp_path):
    ref = make(tmp_path / "src", T.Qwen2Config(**COMMON, num_key_value_heads=2), T.Qwen2ForCausalLM)
    model = minidpo.load_model(str(tmp_path / "src"), dtype="bfloat16")
    out = minidpo.save_pretrained(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as h:
        assert {h.get_tensor(n).dtype for n in h.keys()} == {torch.bfloat16}
    back = T.Qwen2ForCausalLM.from_pretrained(out).eval()  # dtype "auto" reads config.json
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.model.layers[0].self_attn.k_proj.bias,
                       ref.model.layers[0].self_attn.k_proj.bias.to(torch.bfloat16))
    # A transformers-4 config keeps its torch_dtype key, updated too.
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    hf["torch_dtype"] = hf.pop("dtype")
    model.cfg.hf_config = hf
    saved = json.loads((minidpo.save_pretrained(model, tmp_path / "out4") / "config.json").read_text())
    assert saved["torch_dtype"] == saved["dtype"] == "bfloat16"


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_is_atomic(tmp_path, monkeypatch):
    make(tmp_path / "src", llama(), T.LlamaForCausalLM)
    model = minidpo.load_model(str(tmp_path / "src"))
    out = tmp_path / "out"
    minidpo.save_pretrained(model, out, max_shard_bytes=40_000)
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # a newer checkpoint that must not half-replace the old one
    before = snapshot(out)

    real_save_file, calls = ckpt.save_file, []

    def failing_save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        minidpo.save_pretrained(model, out, max_shard_bytes=40_000)
    assert len(calls) == 2  # it failed after writing the first shard
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

    # With save_file working again, the new checkpoint replaces the old one completely.
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    minidpo.save_pretrained(model, out, max_shard_bytes=40_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert torch.equal(minidpo.load_model(str(out)).embed.weight, model.embed.weight)


def test_save_keeps_the_sampling_defaults(tmp_path):
    make(tmp_path / "src", llama(), T.LlamaForCausalLM)
    settings = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [2, 3]}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(settings))
    out = minidpo.save_pretrained(minidpo.load_model(str(tmp_path / "src")), tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text()) == settings
    loaded = T.GenerationConfig.from_pretrained(out)
    assert (loaded.do_sample, loaded.temperature, loaded.top_p, loaded.top_k) == (True, 0.7, 0.8, 20)


def test_saved_directory_gets_the_usual_permissions(tmp_path):
    make(tmp_path / "src", llama(), T.LlamaForCausalLM)
    out = minidpo.save_pretrained(minidpo.load_model(str(tmp_path / "src")), tmp_path / "out")
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's private 0700


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch, minidpo
    torch.set_num_threads(1)

    def peak_rss():
        # VmHWM: this process's peak resident set, in kB. Not ru_maxrss: Linux carries ru_maxrss
        # over from the parent across fork and exec, so a child of a big pytest process would
        # report pytest's peak and no growth at all.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def file_rss():
        # RssFile: resident pages of mapped files (the libraries, and any mapped checkpoint).
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024

    before, file_before = peak_rss(), file_rss()
    model = minidpo.load_model(sys.argv[1])
    after, file_after = peak_rss(), file_rss()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print((after - before) / weights, (file_after - file_before) / weights)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
def test_load_peak_memory_is_about_one_copy(tmp_path):
    """Peak-RSS growth during load_model, in a fresh process, over the weights' size; and no file
    left mapped.
    Measured 1.15-1.38 for this 598 MB fp32 model (torch 2.13 CPU): each tensor is read from the
    file into memory of its own, nothing stays mapped, and only a fused tensor's parts exist twice,
    briefly. A second copy of every tensor (tried: .clone() after a mapped load) measures 2.14."""
    make_script = (
        "import sys, torch, transformers as T; torch.manual_seed(0)\n"
        "cfg = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048,"
        " num_hidden_layers=8, num_attention_heads=16)\n"
        "T.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    big = tmp_path / "big"
    try:
        subprocess.run([sys.executable, "-c", make_script, str(big)], check=True, env=env, capture_output=True)
        assert (big / "model.safetensors").stat().st_size > 500e6
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(big)], check=True, env=env,
                                capture_output=True, text=True)
    finally:
        shutil.rmtree(big, ignore_errors=True)  # pytest keeps recent tmp dirs; don't keep 600 MB in them
    ratio, mapped = map(float, result.stdout.strip().splitlines()[-1].split())
    assert 0.5 < ratio < 1.6, ratio
    # A memory-mapped load (safetensors' safe_open) would leave the pages read for the fused
    # tensors resident for the model's lifetime: 37% of this model's weights.
    assert mapped < 0.05, mapped


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file, tensor or name at fault.


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    make(path, llama(), T.LlamaForCausalLM)
    return path


def edit_config(path, **changes):
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))


def test_error_unsupported_architecture(tiny_dir):
    edit_config(tiny_dir, architectures=["FalconForCausalLM"])
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)),
                    "FalconForCausalLM", "Llama", "Qwen2", "GPTNeoX", "Gemma3", "ForCausalLM", "ForSequenceClassification")


def test_error_missing_config(tiny_dir):
    (tiny_dir / "config.json").unlink()
    raises_one_line(FileNotFoundError, lambda: minidpo.load_model(str(tiny_dir)), tiny_dir / "config.json")


def test_error_config_not_json(tiny_dir):
    (tiny_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  oops')
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)), tiny_dir / "config.json", "JSON")


@pytest.mark.parametrize("config, says", [
    ([], "holds a JSON list, not an object"),
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 96}, "has no 'num_attention_heads'"),
    ({"architectures": None}, "unsupported architecture"),
])
def test_error_config_content(tiny_dir, config, says):
    (tiny_dir / "config.json").write_text(json.dumps(config))
    for num_labels in (None, 1):  # also as a reward model, which rewrites the config first
        raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir), num_labels=num_labels),
                        tiny_dir / "config.json" if "architecture" not in says else "?", says)


def test_error_index_without_weight_map(tiny_dir):
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)),
                    tiny_dir / "model.safetensors.index.json", "'weight_map'")


def test_error_integer_weights(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    state["model.norm.weight"] = torch.full((64,), 3, dtype=torch.int64)
    save_file(state, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)),
                    tiny_dir, "model.norm.weight", "torch.int64", "not floating-point")


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_error_pickle_weights_are_never_unpickled(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    sentinel = tiny_dir.parent / "unpickled"
    (tiny_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(sentinel))))
    message = raises_one_line(FileNotFoundError, lambda: minidpo.load_model(str(tiny_dir)),
                              tiny_dir, "pytorch_model.bin", "never unpickles", "save_pretrained",
                              "safe_serialization=True")
    assert not sentinel.exists(), message


def corrupt_header(raw: bytes, edit) -> bytes:
    """The file with its JSON header passed through edit (the data left as it was)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(edit(json.loads(raw[8 : 8 + n]))).encode()
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def wrong_offsets(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 3]
    return header


@pytest.mark.parametrize("corrupt, says", [
    (lambda raw: raw[: len(raw) // 2], "bytes ["),  # truncated: the tensors at the end lie past it
    (lambda raw: b"", "too few"),
    (lambda raw: os.urandom(64), "too few"),
    (lambda raw: corrupt_header(raw, lambda header: list(header)), "not a JSON object"),
    (lambda raw: corrupt_header(raw, wrong_offsets), "do not fit its shape"),
])
def test_error_corrupt_safetensors(tiny_dir, corrupt, says):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)), f, "safetensors", says)


@pytest.mark.parametrize("name, shape", [
    ("model.layers.1.self_attn.k_proj.weight", (40, 64)),  # a fused part, wrong rows: not q_proj's fault
    ("model.layers.1.self_attn.k_proj.weight", (32, 48)),  # wrong columns: would break torch.cat
    ("model.layers.0.mlp.up_proj.weight", (96, 60)),
    ("model.layers.0.self_attn.o_proj.weight", (64, 65)),
    ("model.norm.weight", (63,)),
])
def test_error_tensor_shape_does_not_fit_config(tiny_dir, name, shape):
    state = load_file(tiny_dir / "model.safetensors")
    state[name] = torch.zeros(shape)
    save_file(state, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    message = raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)),
                              tiny_dir, name, str(shape), "config.json")
    assert message.count("model.layers") + message.count("model.norm") == 1  # names only the culprit


def test_error_missing_tensor(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    raises_one_line(ValueError, lambda: minidpo.load_model(str(tiny_dir)),
                    tiny_dir, "model.layers.1.mlp.gate_proj.weight", "missing")


def test_error_tokenizer_larger_than_the_embedding(tiny_dir):
    from tokenizers import Tokenizer as Backend, models

    for tokens in (VOCAB - 4, VOCAB + 1):  # fewer tokens than rows is common (padded vocabularies)
        Backend(models.WordLevel({f"w{i}": i for i in range(tokens)}, unk_token="w0")).save(
            str(tiny_dir / "tokenizer.json"))
        if tokens <= VOCAB:
            minidpo.load_pretrained(str(tiny_dir))
        else:
            raises_one_line(ValueError, lambda: minidpo.load_pretrained(str(tiny_dir)), tiny_dir,
                            f"the tokenizer has {VOCAB + 1} tokens", f"vocab_size of {VOCAB}")


def test_error_missing_tokenizer(tiny_dir):
    assert not list(tiny_dir.glob("tokenizer*"))
    raises_one_line(FileNotFoundError, lambda: minidpo.load_pretrained(str(tiny_dir)), tiny_dir)


def test_error_unknown_offline_model():
    raises_one_line(FileNotFoundError, lambda: minidpo.load_model("offline:GPT-5"),
                    "offline:GPT-5", "offline:SmolLM2-135M-Instruct")


def test_error_local_path_that_is_not_a_model_dir(tmp_path):
    missing = tmp_path / "nowhere"
    raises_one_line(FileNotFoundError, lambda: minidpo.load_model(str(missing)), missing)


def test_error_hub_unreachable(monkeypatch):
    import huggingface_hub

    def unreachable(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    message = raises_one_line(FileNotFoundError, lambda: minidpo.load_model("someorg/some-model"),
                              "'someorg/some-model'", "Hub", "couldn't connect")
    assert "Check your connection" not in message


def test_hub_repo_id_downloads_without_pickles(tiny_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = minidpo.load_model("someorg/some-model")
    assert torch.equal(logits(model), logits(minidpo.load_model(str(tiny_dir))))
    assert len(calls) == 1 and calls[0]["repo_id"] == "someorg/some-model"
    patterns = calls[0]["allow_patterns"]

    def fetched(filename):
        return any(fnmatch.fnmatch(filename, p) for p in patterns)

    for wanted in ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                   "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja"]:
        assert fetched(wanted), wanted
    for pickled in ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "training_args.bin",
                    "optimizer.pt", "rng_state.pth", "model.ckpt", "flax_model.msgpack", "tf_model.h5"]:
        assert not fetched(pickled), pickled
