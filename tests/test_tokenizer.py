"""minidpo.tokenizer against transformers as the reference, on small tokenizers trained here (no Hub)."""

import json

import jinja2
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from minidpo.tokenizer import Tokenizer
from tokenizer_world import LLAMA2_TEMPLATE, QWEN2_TEMPLATE, SMOLLM2_TEMPLATE, chatml_config, write_dir

transformers = pytest.importorskip("transformers")

TOOLS_TEMPLATE = """{% if tools is not none %}
    <tools>{{ tools | tojson(indent=2) }}</tools>
{% endif %}
{% for message in messages %}
    {% if message['content'] == 'stop' %}{% break %}{% endif %}
    <|im_start|>{{ message['role'] }}|{{ pad_token }}|{{ message | tojson }}<|im_end|>
{% endfor %}
"""

SYS = {"role": "system", "content": "You are terse."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [SYS, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🎉, café"}, {"role": "assistant", "content": "  spaced  \n\n"},
     {"role": "user", "content": "tabs\tand <|im_end|> inside"}],
]
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "digits 1234567890 and 3.14159",
    "Ünïcödé 日本語 émoji 🎉🚀 naïve café",
    "line\nbreaks\n\n\tand tabs",
    "<|im_start|>user\nspecial tokens inside<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def chatml(backend, tmp_path_factory):
    d = write_dir(tmp_path_factory.mktemp("chatml"), backend, chatml_config())
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def llama(backend, tmp_path_factory):
    # A BOS-adding post-processor, and an add_bos_token=False that transformers 5 ignores.
    tok = Backend.from_str(backend.to_str())
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    config = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": False,
              "chat_template": LLAMA2_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    d = write_dir(tmp_path_factory.mktemp("llama"), tok, config)
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


def hf_chat_ids(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("fixture", ["chatml", "llama"])
def test_encode_decode_match_transformers(request, fixture, text):
    tok, hf = request.getfixturevalue(fixture)
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == hf.encode(text, add_special_tokens=add)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(torch.tensor(tok.encode(text))) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_special_tokens_and_vocab_match_transformers(chatml, llama):
    for tok, hf in (chatml, llama):
        assert tok.vocab_size == len(hf)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            assert getattr(tok, name) == getattr(hf, name), name
        assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert chatml[0].pad_token_id == chatml[1].pad_token_id == chatml[0].encode("<|endoftext|>")[0]
    assert llama[0].encode("hi")[0] == llama[0].bos_token_id  # the post-processor's BOS is kept


@pytest.mark.parametrize("template", [QWEN2_TEMPLATE, SMOLLM2_TEMPLATE, TOOLS_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chatml_templates_match_transformers(chatml, template, messages, gen):
    tok, hf = chatml
    tok.chat_template = hf.chat_template = template
    text = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == hf_chat_ids(
        hf, messages, add_generation_prompt=gen)


def test_qwen2_default_system_message(chatml):
    tok, _ = chatml
    tok.chat_template = QWEN2_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tools_kwarg_tojson_and_strftime(chatml):
    tok, hf = chatml
    template = TOOLS_TEMPLATE + "{{ strftime_now('%Y') }}"
    tok.chat_template = hf.chat_template = template
    tools = [{"name": "lookup", "description": "finds <b>café</b> & 'more'", "parameters": {"q": "string"}}]
    messages = [{"role": "user", "content": "héllo", "tool_calls": None}, {"role": "assistant", "content": "stop"},
                {"role": "user", "content": "never shown"}]
    text = tok.apply_chat_template(messages, tools=tools)
    assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "café</b> & 'more'" in text and "never shown" not in text and "None" not in text


@pytest.mark.parametrize("messages", [CONVERSATIONS[1], CONVERSATIONS[2][:2], [SYS, {"role": "user", "content": "x"}]])
def test_llama_template_matches_transformers(llama, messages):
    tok, hf = llama
    text = tok.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == hf_chat_ids(hf, messages)
    # BOS comes only from the template (once per user turn), not also from the post-processor.
    assert ids.count(tok.bos_token_id) == sum(m["role"] == "user" for m in messages)


def test_raise_exception_in_template(llama):
    tok, hf = llama
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(ValueError, match="^the chat template rejected a conversation: .*roles must alternate"):
        tok.apply_chat_template(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(chatml, side):
    tok, hf = chatml
    ids, mask = tok(TEXTS, padding_side=side)
    ref = hf(TEXTS, padding=True, padding_side=side)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]
    assert tok.batch_decode(ids) == hf.batch_decode(ref["input_ids"], skip_special_tokens=True)


def test_special_tokens_chosen_per_text(llama):
    # A batch mixing plain prompts (BOS added) with chat-templated ones (BOS written by the template).
    tok, hf = llama
    ids, mask = tok(TEXTS[:3], add_special_tokens=[True, False, True], padding_side="right")
    want = [hf.encode(text, add_special_tokens=add) for text, add in zip(TEXTS[:3], (True, False, True))]
    assert [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())] == want
    assert [row[0] == hf.bos_token_id for row in want] == [True, False, True]


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_matches_transformers(chatml, side):
    tok, hf = chatml
    ids, mask = tok(TEXTS, max_length=5, truncation_side=side, padding_side="right")
    hf.truncation_side = side
    ref = hf(TEXTS, padding=True, padding_side="right", truncation=True, max_length=5)
    hf.truncation_side = "right"
    assert ids.shape == (len(TEXTS), 5)
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]


def test_pad_falls_back_to_eos(backend, tmp_path):
    d = write_dir(tmp_path, backend, {"eos_token": "<|im_end|>"})
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.pad_token is None and tok.pad_token_id == tok.eos_token_id == tok.encode("<|im_end|>")[0]
    tok.chat_template = hf.chat_template = TOOLS_TEMPLATE
    msgs = CONVERSATIONS[1]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False)  # pad_token is undefined
    hf.pad_token = hf.eos_token
    ids, mask = tok(["a", "a much longer text"])
    ref = hf(["a", "a much longer text"], padding=True, padding_side="left")
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]


def test_padding_baked_into_tokenizer_json_is_ignored(backend, tmp_path):
    tok = Backend.from_str(backend.to_str())
    tok.enable_padding(length=32, pad_id=0)
    tok.enable_truncation(max_length=3)
    d = write_dir(tmp_path, tok, {"eos_token": "<|im_end|>"})
    text = "the quick brown fox jumps"
    assert Tokenizer.from_dir(d).encode(text) == transformers.AutoTokenizer.from_pretrained(d).encode(text)
    assert len(Tokenizer.from_dir(d).encode(text)) == len(backend.encode(text).ids) > 3


def test_jinja_file_wins_over_config(backend, tmp_path):
    d = write_dir(tmp_path, backend, chatml_config(QWEN2_TEMPLATE), chat_template__jinja=SMOLLM2_TEMPLATE)
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == hf.chat_template == SMOLLM2_TEMPLATE
    msgs = CONVERSATIONS[0]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False)


def test_list_of_templates_picks_default(backend, tmp_path):
    templates = [{"name": "tool_use", "template": QWEN2_TEMPLATE}, {"name": "default", "template": SMOLLM2_TEMPLATE}]
    d = write_dir(tmp_path, backend, chatml_config(templates))
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    msgs = CONVERSATIONS[1]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == hf.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False)


def test_special_tokens_map_fallback_and_added_token_dicts(backend, tmp_path):
    config = {"eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "special": True}}
    d = write_dir(tmp_path, backend, config,
                  special_tokens_map__json={"bos_token": "<|im_start|>", "pad_token": {"content": "<|endoftext|>"}})
    tok, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)


@pytest.mark.parametrize("gen_eos", [[2, 0, 2], 0])
def test_generation_config_eos_ids(backend, tmp_path, gen_eos):
    d = write_dir(tmp_path, backend, {"eos_token": "<|im_end|>"}, generation_config__json={"eos_token_id": gen_eos})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id == backend.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_ids == [2, 0]


def test_save_loads_in_transformers_and_round_trips(backend, tmp_path):
    src = write_dir(tmp_path / "src", backend, chatml_config(SMOLLM2_TEMPLATE))
    tok = Tokenizer.from_dir(src)
    tok.save(tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8") == SMOLLM2_TEMPLATE
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    again = Tokenizer.from_dir(tmp_path / "out")
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text) == again.encode(text)
    assert hf.chat_template == again.chat_template == SMOLLM2_TEMPLATE
    for msgs in CONVERSATIONS:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True)
        assert text == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == again.apply_chat_template(msgs, add_generation_prompt=True)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "pad_token_id", "eos_token_ids", "vocab_size"):
        assert getattr(again, name) == getattr(tok, name), name
    assert (hf.eos_token, hf.pad_token) == (tok.eos_token, tok.pad_token)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
@pytest.mark.parametrize("text, says", [('{"eos_token": ', "is not valid JSON"), ("[1]", "holds a JSON list")])
def test_corrupt_side_files_name_the_file(backend, tmp_path, name, text, says):
    write_dir(tmp_path, backend)
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / name} {says}") and "\n" not in str(info.value)


def test_no_chat_template(backend, tmp_path):
    tok = Tokenizer.from_dir(write_dir(tmp_path, backend))
    assert tok.chat_template is None and tok.eos_token is None and tok.eos_token_ids == []
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
