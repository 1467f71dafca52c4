"""The families beyond Llama/Qwen2/GPT-NeoX (Qwen3, Mistral, Gemma 2 and 3, Phi-3, OLMo 2, SmolLM3)
against transformers 5.24 on tiny random configs.

Every config has a sliding window (4 positions) shorter than the inputs where its family has one,
and switches set away from their defaults where that makes them matter (Gemma 2's caps small enough
for tanh to bend, query_pre_attn_scalar != head_dim, head_dim != hidden / heads, partial rotary).
The reference sees each row alone, unpadded: transformers measures a window in columns, so in a
left-padded batch its window would count pads; minidpo's counts real tokens (model.py), and each
padded row must equal the row alone.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers as T

import minidpo
from minidpo import last_token_scores
from minidpo.checkpoint import hf_state_dict
from minidpo.packing import pack_pairs
from minidpo.sampler import generate
from model_helpers import COMMON, VOCAB, build, random_ids

WINDOW = 4
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
BASE = dict(COMMON, num_key_value_heads=2, **IDS)
TWO_TYPES = ["sliding_attention", "full_attention"]
FAMILIES = {
    # name: (config, causal LM class, sequence-classification class)
    "qwen3": (lambda: T.Qwen3Config(**BASE, head_dim=24), T.Qwen3ForCausalLM, T.Qwen3ForSequenceClassification),
    "qwen3_window": (lambda: T.Qwen3Config(**BASE, head_dim=24, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1), T.Qwen3ForCausalLM, None),
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
SWITCH_OFF = [("mistral", "sliding_window", None), ("qwen3_window", "sliding_window", None),
              ("gemma2", "attn_softcap", None), ("gemma2", "final_softcap", None), ("gemma2", "attn_scale", None),
              ("gemma3", "local_rope_theta", 1e6), ("gemma3", "qk_norm", None), ("gemma3", "embed_scale", False),
              ("olmo2", "norm_layout", "pre"), ("phi3", "rotary_dim", 16), ("smollm3", "rope_layers", None),
              ("qwen3", "qk_norm", None)]


@pytest.mark.parametrize("name,field,value", SWITCH_OFF)
def test_each_switch_matters(tmp_path, name, field, value):
    ref, model = make(tmp_path, name)
    cfg = minidpo.ModelConfig(**{**vars(model.cfg), field: value})
    other = minidpo.Transformer(cfg)
    other.load_state_dict(model.state_dict(), strict=False)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert (other(ids) - ref(input_ids=ids).logits).abs().max().item() > 1e-2
