"""minidpo.model against transformers, the independent reference (a dev-only dependency).

Each tiny model is built by transformers from its own config class, given random weights (biases
and norm weights included, which transformers would initialise to 0 and 1 and so never test),
saved with `save_pretrained`, and loaded back with `minidpo.load_model`: the comparison covers the
config mapping and the tensor fusion as well as the forward pass.
"""

import pytest
import torch
import transformers as T

import minidpo
from minidpo import last_token_scores
from model_helpers import CAUSAL, COMMON, TOL, VOCAB, build, hf_positions, random_ids

@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_logits_match_transformers(tmp_path, name):
    config, cls = CAUSAL[name]()
    ref, model = build(tmp_path, config, cls)
    ids = random_ids(2, 48)
    with torch.no_grad():
        ours, theirs = model(ids), ref(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 48, VOCAB)
    assert (ours - theirs).abs().max().item() <= TOL
    # The comparison must be sensitive: these logits are far from trivially equal.
    assert theirs.std().item() > 0.1


def test_rope_scaling_is_applied(tmp_path):
    """Guard against the tests above passing vacuously: the same weights without the Llama 3
    scaling give clearly different logits past the first few positions."""
    config, cls = CAUSAL["llama3_rope"]()
    ref, model = build(tmp_path, config, cls)
    plain = minidpo.Transformer(minidpo.ModelConfig(**{**vars(model.cfg), "rope_scaling": None}))
    plain.load_state_dict(model.state_dict())
    ids = random_ids(1, 48)
    with torch.no_grad():
        assert (plain(ids) - ref(input_ids=ids).logits).abs().max().item() > 100 * TOL


SEQ_CLS = {
    "llama": (T.LlamaConfig, T.LlamaForSequenceClassification, dict(num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForSequenceClassification, dict(num_key_value_heads=2)),
    "neox": (T.GPTNeoXConfig, T.GPTNeoXForSequenceClassification, dict(rotary_pct=0.25)),
}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("num_labels", [1, 2])
@pytest.mark.parametrize("family", list(SEQ_CLS))
def test_sequence_classification_scores_match_transformers(tmp_path, family, num_labels, padding):
    config_cls, cls, extra = SEQ_CLS[family]
    ref, model = build(tmp_path, config_cls(**COMMON, **extra, num_labels=num_labels, pad_token_id=0), cls)
    assert model.cfg.num_labels == num_labels
    ids = random_ids(3, 12)
    mask = torch.ones_like(ids)
    for row, n_pad in ((1, 4), (2, 7)):
        cols = slice(None, n_pad) if padding == "left" else slice(12 - n_pad, None)
        mask[row, cols] = 0
    ids = ids.masked_fill(mask == 0, 0)  # transformers finds the last token by pad_token_id
    with torch.no_grad():
        ours = last_token_scores(model(ids, mask), mask)
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert ours.shape == theirs.shape == (3, num_labels)
    assert (ours - theirs).abs().max().item() <= TOL
    # Rows differ from each other: reading the wrong token would not go unnoticed.
    assert (theirs[0] - theirs[1]).abs().max().item() > 10 * TOL


def test_last_token_scores_by_hand():
    scores = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left padded, right padded
    assert last_token_scores(scores, mask).flatten().tolist() == [3.0, 5.0]


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied", "neox_parallel"])
def test_left_padded_batch_matches_rows_alone_and_transformers(tmp_path, name):
    config, cls = CAUSAL[name]()
    ref, model = build(tmp_path, config, cls)
    lengths = [10, 6, 3]
    T_ = max(lengths)
    ids = random_ids(3, T_, seed=5)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T_ - n:] = 1
    with torch.no_grad():
        batch = model(ids, mask)
        # Each row alone, unpadded: what the padded batch must reproduce at its real tokens.
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, T_ - n:])
            assert (batch[row, T_ - n:] - alone[0]).abs().max().item() <= TOL
        # transformers' plain forward numbers positions 0..T-1 in every row, pads included, so a
        # left-padded row's first real token sits at position (number of pads), not 0. Rotary
        # attention scores depend only on position differences, so that offset cancels in exact
        # arithmetic, but each token is rotated by a different angle and rounds differently (in
        # bf16 visibly so). minidpo counts only real tokens; given the same positions explicitly,
        # transformers does the same computation and the tolerance measures the implementations,
        # not the rounding of two different rotations.
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        real = mask.bool()
        assert (batch[real] - theirs[real]).abs().max().item() <= TOL


def test_bf16_matches_transformers_bf16_and_fp32(tmp_path):
    config, cls = CAUSAL["llama_gqa_untied"]()
    ref, model32 = build(tmp_path, config, cls)
    model16 = minidpo.load_model(str(tmp_path), dtype=torch.bfloat16).eval()
    ref16 = cls.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert ref16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    real = mask.bool()
    with torch.no_grad():
        ours16 = model16(ids, mask)
        theirs16 = ref16(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        ours32 = model32(ids, mask)
    assert ours16.dtype == theirs16.dtype == torch.bfloat16
    scale = ours32[real].abs().max().item()
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%), and one op rounded differently moves
    # these logits by 1.3-1.8% (tried: RMSNorm without its fp32 upcast). Loose tolerances, as
    # fractions of the largest |logit|: 2% between the two bf16 implementations (measured on CPU,
    # torch 2.13: 0, they agree bit for bit) and 5% against fp32 (measured: 1.4-1.8%, four seeds).
    assert (ours16.float() - theirs16.float())[real].abs().max().item() <= 0.02 * scale
    assert (ours16.float() - ours32)[real].abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied"])
def test_gradients_match_transformers(tmp_path, name):
    config, cls = CAUSAL[name]()
    ref, model = build(tmp_path, config, cls)
    ref.train(), model.train()  # no dropout in these configs; train mode as in training
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    targets = random_ids(2, 16, seed=9)

    def loss_of(logits):
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (per_token * mask).sum() / mask.sum()

    loss_of(model(ids, mask)).backward()
    loss_of(ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits).backward()

    theirs = dict(ref.named_parameters())
    ours = dict(model.named_parameters())

    def grad(*names):
        return torch.cat([theirs[n].grad for n in names])

    attn0, mlp1 = "model.layers.0.self_attn.", "model.layers.1.mlp."
    pairs = {
        # Fused q/k/v: cat(q_proj, k_proj, v_proj) along the output features.
        "layers.0.attn.qkv.weight": grad(attn0 + "q_proj.weight", attn0 + "k_proj.weight", attn0 + "v_proj.weight"),
        "layers.0.attn.qkv.bias": grad(attn0 + "q_proj.bias", attn0 + "k_proj.bias", attn0 + "v_proj.bias"),
        # Fused SwiGLU: cat(gate_proj, up_proj).
        "layers.1.mlp.up.weight": grad(mlp1 + "gate_proj.weight", mlp1 + "up_proj.weight"),
        "layers.1.mlp_norm.weight": grad("model.layers.1.post_attention_layernorm.weight"),
        "embed.weight": grad("model.embed_tokens.weight"),  # Qwen2 here is tied: input and output use
    }
    for ours_name, expected in pairs.items():
        got = ours[ours_name].grad
        assert got is not None, ours_name
        assert expected.abs().max().item() > 1e-4, ours_name  # a real gradient, not ~0
        assert (got - expected).abs().max().item() <= 1e-5 + 1e-4 * expected.abs().max().item(), ours_name


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct imported from its GGUF (conftest's offline_model_dir).

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real(offline_model_dir):
    """minidpo's model, transformers' model and tokenizer, all from the same directory; loaded
    once for the module."""
    torch.manual_seed(0)
    tok = T.AutoTokenizer.from_pretrained(offline_model_dir)
    ref = T.AutoModelForCausalLM.from_pretrained(offline_model_dir, dtype=torch.float32).eval()
    model = minidpo.load_model(str(offline_model_dir)).eval()
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return model, ref, tok, ids


@pytest.mark.slow
def test_real_model_logits_match_transformers(real):
    model, ref, tok, ids = real
    assert ids.shape[1] > 20  # the chat template (system prompt, turns) was applied
    with torch.no_grad():
        ours, theirs = model(ids), ref(input_ids=ids).logits
    rel = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    assert rel <= 1e-3


@pytest.mark.slow
def test_real_model_greedy_answer(real):
    model, ref, tok, ids = real
    with torch.no_grad():
        for _ in range(12):
            next_id = model(ids)[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    answer = tok.decode(ids[0, -12:], skip_special_tokens=True)
    assert answer.strip().startswith("The capital of France is Paris."), answer
