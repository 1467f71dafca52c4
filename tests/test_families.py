"""The families beyond Llama/Qwen2/GPT-NeoX (Qwen3, Mistral, Gemma 2 and 3, Phi-3, OLMo 2, SmolLM3)
against transformers 5.24 on tiny random configs.

Every config has a sliding window (4 positions) shorter than the inputs where its family has one,
and switches set away from their defaults where that makes them matter (Gemma 2's caps small enough
for tanh to bend, query_pre_attn_scalar != head_dim, head_dim != hidden / heads, partial rotary).
The reference sees each row alone, unpadded: transformers measures a window in columns, so in a
left-padded batch its window would count pads; minidpo's counts real tokens (model.py), and each
padded row must equal the row alone.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T

import minidpo
from minidpo import last_token_scores
from minidpo.checkpoint import hf_state_dict
from minidpo.packing import pack
from minidpo.sampler import Sampler, generate
from model_helpers import COMMON, build, random_ids
from minidpo.tokenizer import Tokenizer
from tiny_world import MODEL, WORDS, save_model, save_tokenizer
import train

WINDOW = 4
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
BASE = dict(COMMON, num_key_value_heads=2, **IDS)
TWO_TYPES = ["sliding_attention", "full_attention"]
FAMILIES = {
    # name: (config, causal LM class, sequence-classification class)
    "qwen3": (lambda: T.Qwen3Config(**BASE, head_dim=24), T.Qwen3ForCausalLM, T.Qwen3ForSequenceClassification),
    "qwen3_window": (lambda: T.Qwen3Config(**BASE, head_dim=24, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1), T.Qwen3ForCausalLM, None),
    "qwen2_window": (lambda: T.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1), T.Qwen2ForCausalLM, None),
    "mistral": (lambda: T.MistralConfig(**BASE, head_dim=24, sliding_window=WINDOW), T.MistralForCausalLM,
                T.MistralForSequenceClassification),
    "gemma2": (lambda: T.Gemma2Config(**BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                      attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               T.Gemma2ForCausalLM, T.Gemma2ForSequenceClassification),
    "gemma3": (lambda: T.Gemma3TextConfig(**BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                          layer_types=TWO_TYPES),
               T.Gemma3ForCausalLM, T.Gemma3TextForSequenceClassification),
    "phi3": (lambda: T.Phi3Config(**BASE, sliding_window=WINDOW, partial_rotary_factor=0.5), T.Phi3ForCausalLM,
             T.Phi3ForSequenceClassification),
    "olmo2": (lambda: T.Olmo2Config(**BASE), T.Olmo2ForCausalLM, T.Olmo2ForSequenceClassification),
    "smollm3": (lambda: T.SmolLM3Config(**BASE, no_rope_layer_interval=2), T.SmolLM3ForCausalLM,
                T.SmolLM3ForSequenceClassification),
}
HEADS = [(name, head) for name, (_, _, cls) in FAMILIES.items() for head in ("causal", "classifier")[: 1 + bool(cls)]]
LENGTHS = [16, 11, 5]  # a left-padded batch; the window (4) is shorter than each row


def make(tmp_path, name, head="causal", seed=0):
    config_fn, causal, classifier = FAMILIES[name]
    config = config_fn()
    if head == "classifier":
        config.num_labels = 2
    return build(tmp_path, config, causal if head == "causal" else classifier, seed)


def left_padded(lengths=LENGTHS, seed=5):
    width = max(lengths)
    ids = random_ids(len(lengths), width, seed=seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def close(ours, theirs, rel=1e-4):
    scale = theirs.abs().max().item()
    assert (ours.float() - theirs.float()).abs().max().item() <= rel * scale, (ours - theirs).abs().max()


@pytest.mark.parametrize("name,head", HEADS)
def test_logits_match_transformers(tmp_path, name, head):
    ref, model = make(tmp_path, name, head)
    ids, mask = left_padded()
    with torch.no_grad():
        batch = model(ids, mask)
        for row, n in enumerate(LENGTHS):
            alone_ids = ids[row:row + 1, -n:]
            alone, theirs = model(alone_ids), ref(input_ids=alone_ids).logits
            if head == "classifier":
                alone, theirs = alone[:, -1], theirs
                close(last_token_scores(batch[row:row + 1], mask[row:row + 1]), theirs)
            else:
                close(batch[row, -n:], alone[0])
            close(alone, theirs)
    assert theirs.std().item() > 0.1  # far from trivially equal


# Each switch must matter at these sizes: off, the logits move well past the tolerance.
SWITCH_OFF = [("mistral", "sliding_window", None), ("qwen2_window", "sliding_window", None),
              ("qwen3_window", "sliding_window", None),
              ("gemma2", "attn_softcap", None), ("gemma2", "final_softcap", None), ("gemma2", "attn_scale", None),
              ("gemma3", "local_rope_theta", 1e6), ("gemma3", "qk_norm", None), ("gemma3", "embed_scale", False),
              ("olmo2", "norm_layout", "pre"), ("phi3", "rotary_dim", 16), ("smollm3", "rope_layers", None),
              ("qwen3", "qk_norm", None), ("gemma2", "norm_offset", 0.0)]


@pytest.mark.parametrize("name,field,value", SWITCH_OFF)
def test_each_switch_matters(tmp_path, name, field, value):
    ref, model = make(tmp_path, name)
    cfg = minidpo.ModelConfig(**{**vars(model.cfg), field: value})
    other = minidpo.Transformer(cfg)
    other.load_state_dict(model.state_dict(), strict=False)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert (other(ids) - ref(input_ids=ids).logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_and_autocast_match_transformers(tmp_path, name):
    """bf16 weights, and fp32 weights under bf16 autocast (the trainer's --bf16), both as transformers
    computes them: Gemma's (1 + weight) norms in fp32, caps and embedding scale in bf16."""
    ref, model = make(tmp_path, name)
    ids = random_ids(2, 16)
    with torch.no_grad():
        fp32 = ref(input_ids=ids).logits
        with torch.autocast("cpu", torch.bfloat16):
            ours_auto, theirs_auto = model(ids), ref(input_ids=ids).logits
        ref16 = type(ref).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        ours16 = minidpo.load_model(str(tmp_path), dtype=torch.bfloat16).eval()
        ours_bf16, theirs_bf16 = ours16(ids), ref16(input_ids=ids).logits
    assert ours_auto.dtype == theirs_auto.dtype == ours_bf16.dtype == theirs_bf16.dtype == torch.bfloat16
    # bf16's relative step is 2^-8; one op rounded differently moves these logits by ~1-2% of the
    # largest |logit|, so 2% between the implementations (measured: 0, bit for bit, CPU, torch 2.13).
    close(ours_auto, theirs_auto, 0.02)
    close(ours_bf16, theirs_bf16, 0.02)
    assert (theirs_bf16.float() - fp32).abs().max().item() > 0  # bf16 really ran


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gemma2"])
def test_gradients_match_transformers(tmp_path, name):
    """Gradients of every parameter, of a loss on log p(targets) through the chunked token_logprobs
    path (Gemma 2: through its final soft-cap), against transformers' log_softmax of its logits."""
    ref, model = make(tmp_path, name)
    ref.train(), model.train()
    ids, mask = left_padded()
    targets = random_ids(*ids.shape, seed=9)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2)) * mask
    (model(ids, mask, targets=targets) * weights).sum().backward()
    for row, n in enumerate(LENGTHS):  # the reference row by row (its window would count pads)
        logits = ref(input_ids=ids[row:row + 1, -n:]).logits.float()
        logp = F.log_softmax(logits, -1).gather(-1, targets[row:row + 1, -n:, None])[..., 0]
        (logp * weights[row:row + 1, -n:]).sum().backward()
    ours = hf_state_dict({k: p.grad for k, p in model.named_parameters()}, model.cfg, model.cfg.hf_config)
    theirs = {k: p.grad for k, p in ref.named_parameters()}
    assert set(ours) == set(theirs)
    for key, grad in ours.items():
        assert theirs[key].abs().max().item() > 1e-6, key  # every parameter matters
        torch.testing.assert_close(grad, theirs[key], rtol=1e-4, atol=1e-5 * theirs[key].abs().max().item(), msg=key)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_decoding_matches_transformers_generate(tmp_path, name):
    ref, model = make(tmp_path, name)
    prompts = random_ids(2, 5, seed=11)
    new = 10  # past the window: the cache holds more than it
    ours = generate(model, prompts, torch.ones_like(prompts), max_new_tokens=new, temperature=0,
                    eos_token_ids=[IDS["eos_token_id"]], pad_token_id=0)
    theirs = ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False)
    theirs = theirs[:, prompts.shape[1]:]
    assert ours.ids.shape[1] > WINDOW and ours.ids.tolist() == theirs[:, : ours.ids.shape[1]].tolist()


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3", "qwen3_window"])
def test_cached_decode_with_windows_equals_full_forward(tmp_path, name):
    """Left-padded prompts of different lengths, decoded past the window through the KV cache: each
    row's greedy tokens and final logits equal the full forward of that row alone."""
    _, model = make(tmp_path, name)
    lengths = [7, 3, 5]
    ids, mask = left_padded(lengths, seed=12)
    out = generate(model, ids, mask, max_new_tokens=9, temperature=0)
    with torch.no_grad():
        for row, n in enumerate(lengths):
            seq = ids[row, -n:]
            for _ in range(9):
                seq = torch.cat([seq, model(seq[None])[0, -1].argmax().view(1)])
            assert out.ids[row].tolist() == seq[n:].tolist()


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_packed_scoring_with_windows_equals_each_completion_alone(tmp_path, name):
    """Positions restart for the rejected completion, so its window reaches back into the prompt
    exactly as in a row of its own."""
    _, model = make(tmp_path, name)
    prompts, prompt_mask = left_padded([6, 3], seed=13)
    chosen, rejected = random_ids(2, 7, seed=14), random_ids(2, 7, seed=15)
    pairs = pack(prompts, prompt_mask, torch.stack([chosen, rejected], 1))
    with torch.no_grad():
        packed = model(pairs.input_ids, positions=pairs.positions, block_mask=pairs.block_mask,
                       logits_to_keep=pairs.predicting, targets=pairs.targets)
        for row, n in enumerate([6, 3]):
            for part, completion in enumerate([chosen, rejected]):
                seq = torch.cat([prompts[row, -n:], completion[row]])[None]
                alone = F.log_softmax(model(seq)[0, n - 1 : -1], -1).gather(-1, completion[row, :, None])[:, 0]
                close(packed[row, part * 7 : (part + 1) * 7], alone)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, name):
    _, model = make(tmp_path / "src", name)
    minidpo.save_pretrained(model, tmp_path / "out")
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        close(model(ids), theirs(input_ids=ids).logits)
    if name == "phi3":  # fused as Phi-3 stores them
        names = theirs.state_dict().keys()
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names


@pytest.mark.parametrize("head", ["causal", "classifier"])
def test_gemma3_vision_language_checkpoint_loads_its_language_model(tmp_path, head):
    text = FAMILIES["gemma3"][0]()
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    config = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                            num_labels=2)
    cls = T.Gemma3ForConditionalGeneration if head == "causal" else T.Gemma3ForSequenceClassification
    ref, model = build(tmp_path / "vl", config, cls)
    ids = random_ids(2, 16)
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        close(model(ids) if head == "causal" else model(ids)[:, -1], theirs)
    minidpo.save_pretrained(model, tmp_path / "out")
    auto = T.AutoModelForCausalLM if head == "causal" else T.AutoModelForSequenceClassification
    saved = auto.from_pretrained(tmp_path / "out").eval()
    assert type(saved).__name__ == ("Gemma3ForCausalLM" if head == "causal" else "Gemma3TextForSequenceClassification")
    with torch.no_grad():
        close(saved(input_ids=ids).logits, theirs)


@pytest.mark.parametrize("name", ["gemma3", "phi3", "olmo2"])
def test_a_causal_lm_becomes_a_reward_model_transformers_loads(tmp_path, name):
    """--objective reward starts from a causal LM with a new score head and saves the family's
    *ForSequenceClassification (Gemma 3: the text-only one)."""
    make(tmp_path / "lm", name)
    model = minidpo.load_model(str(tmp_path / "lm"), num_labels=1).eval()
    minidpo.save_pretrained(model, tmp_path / "rm")
    theirs = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        close(model(ids)[:, -1], theirs(input_ids=ids).logits)


def test_mixture_of_experts_is_refused_by_name(tmp_path):
    config = T.Qwen3MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    T.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mixture-of-experts") as e:
        minidpo.load_model(str(tmp_path))
    assert "Qwen3MoeForCausalLM" in str(e.value) and "Gemma3" in str(e.value) and "\n" not in str(e.value)


TRAINER_RUNS = {
    # policy, reward model (another family)
    "qwen3_policy_gemma2_rm": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**MODEL, num_key_value_heads=2, head_dim=8)),
                               lambda: T.Gemma2ForSequenceClassification(T.Gemma2Config(
                                   **MODEL, head_dim=8, sliding_window=WINDOW, num_labels=1))),
    "gemma3_policy_mistral_rm": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
                                     **MODEL, head_dim=8, sliding_window=WINDOW, layer_types=TWO_TYPES)),
                                 lambda: T.MistralForSequenceClassification(T.MistralConfig(
                                     **MODEL, num_key_value_heads=2, sliding_window=WINDOW, num_labels=1))),
}


@pytest.mark.parametrize("run", list(TRAINER_RUNS))
def test_train_py_runs_a_policy_with_a_reward_model_of_another_family(tmp_path, run):
    torch.manual_seed(0)
    policy, reward_model = (save_model(tmp_path / name, make_model()) for name, make_model
                            in zip(["policy", "rm"], TRAINER_RUNS[run]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(WORDS[i:i + 4])}]}) + "\n"
                               for i in range(8)))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", policy, "--reward_model_path", reward_model, "--dataset_name", prompts,
            "--output_dir", out, "--max_new_tokens", 8, "--max_length", 64, "--logging_steps", 1,
            "--save_steps", 0, "--max_steps", 3, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3]
    assert train.main([str(a) for a in argv]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    trained, ids = minidpo.load_model(str(out)).eval(), torch.randint(1, MODEL["vocab_size"], (1, 12))
    with torch.no_grad():
        close(trained(ids), T.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits)
        assert (trained(ids) - minidpo.load_model(str(policy))(ids)).abs().max() > 1e-4  # it learned something


# ---------------------------------------------------------------------------------------------
# Chat templates: test templates (written for these tests) that use the jinja features the
# families' own templates use, rendered by minidpo and by transformers' PreTrainedTokenizerFast.

THINKING = """{%- set ns = namespace(last_user=-1, system='') -%}
{%- for m in messages[::-1] -%}
  {%- if ns.last_user < 0 and m.role == 'user' and not m.content.startswith('<tool_response>') -%}
    {%- set ns.last_user = messages|length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools %}<|im_start|>system
Tools:{% for tool in tools %}
{{ tool | tojson }}{% endfor %}<|im_end|>
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set content, reasoning = m.content, m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if not reasoning and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
<|im_start|>assistant
{% if loop.index0 > ns.last_user and reasoning %}<think>
{{ reasoning }}
</think>

{% endif %}{% generation %}{% set content = content.rstrip() %}{{ content }}<|im_end|>{% endgeneration %}
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

ALTERNATING = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set prefix, turns = messages[0]['content'] | trim ~ '\\n\\n', messages[1:] -%}
{%- else -%}
  {%- set prefix, turns = '', messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\\n'
   ~ (prefix if loop.first else '') }}{{ message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif %}"""

LOOP_CONTROLS = """{%- set ns = namespace(system='', last_user=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif -%}
  {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}
{{ bos_token }}
{%- for m in messages -%}
  {%- if loop.index > 12 %}{% break %}{% endif -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- if m.role == 'user' -%}
[INST] {% if loop.index0 == ns.last_user and ns.system %}{{ ns.system }}

{% endif %}{{ m.content }}[/INST]
  {%- elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}
  {%- else %}{{ raise_exception('Only user, assistant and system roles are supported, not ' ~ m.role) }}
  {%- endif -%}
{%- endfor -%}"""

DATES_AND_STRINGS = """{%- set reasoning = '/no_think' if enable_thinking is defined and not enable_thinking else '/think' -%}
{%- set system = messages[0].content if messages[0].role == 'system' else '' -%}
{%- if '/no_think' in system %}{% set reasoning = '/no_think' %}{% endif -%}
<|im_start|>system
## Metadata
Knowledge Cutoff Date: June 2025
Today Date: {{ strftime_now('%d %B %Y') }}
Reasoning Mode: {{ reasoning }}
{{ system.replace('/no_think', '').replace('/think', '').strip() | title }}
{%- if custom_instructions %}
{{ custom_instructions | upper }}{% endif %}
{%- if xml_tools %}
{% for tool in xml_tools %}{{ tool | tojson(indent=2, sort_keys=true) }}
{% endfor %}{{ {'names': xml_tools | map(attribute='name') | list, 'note': 'é <&> "q"'} | tojson }}{% endif %}<|im_end|>
{% for m in messages if m.role != 'system' -%}
<|im_start|>{{ m.role }}
{{ m.content.split() | join(' ') }}{{ ' (' ~ loop.index ~ '/' ~ loop.length ~ ')' if loop.last }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"name": "weather", "description": "Weather <today>", "parameters": {"city": "string"}},
         {"name": "time", "description": "Heure locale", "parameters": {}}]
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "what  is\ta cat"},
     {"role": "assistant", "content": "<think>\nfurry\n</think>\n\na small animal  "},
     {"role": "user", "content": "and a dog?"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two", "reasoning_content": "count"},
     {"role": "user", "content": "<tool_response>3</tool_response>"},
     {"role": "assistant", "content": " four ", "reasoning": "add one"}],  # read as reasoning_content
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],  # refused: roles must alternate
    [{"role": "user", "content": "one"}, {"role": "tool", "content": "two"}],  # refused: no tool role
]
TEMPLATE_KWARGS = [{}, {"enable_thinking": False}, {"enable_thinking": True},
                   {"tools": TOOLS, "xml_tools": TOOLS, "custom_instructions": "be kind"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return path


def both_tokenizers(path, template):
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template, "bos_token": "<unk>"}))
    return Tokenizer.from_dir(path), T.PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("template", [THINKING, ALTERNATING, LOOP_CONTROLS, DATES_AND_STRINGS],
                         ids=["thinking", "alternating", "loop_controls", "dates_and_strings"])
def test_chat_template_features_render_as_transformers_renders_them(tokenizer_dir, template):
    ours, theirs = both_tokenizers(tokenizer_dir, template)
    rendered = refused = 0
    for conversation in CONVERSATIONS:
        for kwargs in TEMPLATE_KWARGS:
            for prompt in (True, False):
                try:
                    want = theirs.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=False,
                                                      **kwargs)
                except Exception as e:  # raise_exception: minidpo refuses the same conversation, same message
                    with pytest.raises(ValueError, match="chat template rejected") as error:
                        ours.apply_chat_template(conversation, add_generation_prompt=prompt, **kwargs)
                    assert str(e).splitlines()[0] in str(error.value)
                    refused += 1
                    continue
                assert ours.apply_chat_template(conversation, add_generation_prompt=prompt, **kwargs) == want
                rendered += 1
    assert rendered >= 8 and (refused > 0) == (template in (ALTERNATING, LOOP_CONTROLS))


def test_eos_list_from_generation_config_stops_generation(tmp_path):
    """generation_config.json names several EOS ids (Gemma, Qwen3 and Llama 3 do); the sampler stops at any,
    where transformers' generate stops."""
    ref, model = make(tmp_path, "qwen3")
    prompt = random_ids(1, 5, seed=11)
    free = generate(model, prompt, torch.ones_like(prompt), max_new_tokens=8, temperature=0)
    tokens = free.ids[0].tolist()
    at = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])  # a token greedy reaches later, not first
    stop = tokens[at]  # becomes the second EOS
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    save_tokenizer(tmp_path)
    _, tok = minidpo.load_pretrained(str(tmp_path))
    assert stop in tok.eos_token_ids
    ours = generate(model, prompt, torch.ones_like(prompt), max_new_tokens=8, temperature=0,
                    eos_token_ids=tok.eos_token_ids)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path).generate(prompt, max_new_tokens=8, do_sample=False)
    assert ours.ids[0].tolist() == theirs[0, 5:].tolist() == tokens[: at + 1] and ours.has_eos.all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_cuda_graph_decode_with_windows_matches_eager(tmp_path, name):
    """The window mask comes from tensors only (the cache's valid columns), so one captured decode
    step serves every step, before and past the window."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    make(tmp_path, name)
    model = minidpo.load_model(str(tmp_path), device="cuda").eval()
    ids, mask = (t.cuda() for t in left_padded([7, 3, 5, 1], seed=12))
    graphs, eager = Sampler(model), Sampler(model, cuda_graphs=False)
    kwargs = dict(n=2, max_new_tokens=16, temperature=0)
    assert torch.equal(graphs.generate(ids, mask, **kwargs).ids, eager.generate(ids, mask, **kwargs).ids)
    assert graphs.captures == 1


def test_olmo2_rotary_in_fp32_is_what_brings_bf16_to_transformers(tmp_path):
    """OLMo 2 never casts its rotary cos/sin to bf16 (rope_fp32). The 2% bf16 tolerance above cannot
    see that one rounding, so compare the two choices: only rotating in fp32 meets transformers."""
    ref, _ = make(tmp_path, "olmo2")
    ref16 = type(ref).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours16 = minidpo.load_model(str(tmp_path), dtype=torch.bfloat16).eval()
    rounded = copy.deepcopy(ours16)
    rounded.cfg.rope_fp32 = False  # read at each forward
    ids = random_ids(2, 16)
    with torch.no_grad():
        theirs = ref16(input_ids=ids).logits.float()
        error, error_rounded = ((m(ids).float() - theirs).abs().max().item() for m in (ours16, rounded))
    assert error < error_rounded  # measured: 0 and 0.04 (CPU, torch 2.13)



@pytest.mark.parametrize("name", ["qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"])
def test_lora_default_targets_are_peft_defaults(tmp_path, name):
    """--use_peft without --lora_target_modules adapts the modules PEFT adapts by default; where PEFT
    has no default for the family it refuses, and so does minidpo, with a line naming the flag."""
    import peft
    from minidpo.lora import LoraSpec, add_adapters, lora_layers

    hf, model = make(tmp_path, name)
    try:
        theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4))
    except ValueError:  # PEFT: "Please specify `target_modules` in `peft_config`"
        with pytest.raises(ValueError, match="needs --lora_target_modules"):
            add_adapters(model, LoraSpec(r=4))
        return
    expected = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                if isinstance(module, peft.tuners.lora.LoraLayer)}
    add_adapters(model, LoraSpec(r=4))
    adapted = {hf_name for layer in lora_layers(model).values() for hf_name, _, _ in layer.slices.values()}
    assert adapted == expected and len(expected) == 2 * 2  # q_proj and v_proj of both layers
