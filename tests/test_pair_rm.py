"""minidpo.pair_rm: the DeBERTa-v2 encoder against transformers' DebertaV2Model, the bucket function
against transformers' for every distance, the input builder, truncation and both-order score against
llm-blender's own collator and ranker (on a tiny random encoder and a tiny Unigram tokenizer), the
invariants, typed prefix tokens, bad directories, real PairRM weights (opt-in), and train.py."""

import importlib
import importlib.util
import json
import os
import sys
import types

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from minidpo.judges import make_judge
from minidpo.pair_rm import PairRMJudge, load_pair_rm, log_bucket
from pair_rm_world import PREFIXES, WORDS, save_pair_rm, save_tokenizer
from tiny_world import base, run

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# The encoder and its relative positions, against transformers.


@pytest.mark.parametrize("buckets, max_relative", [(256, 512), (8, 24), (32, 4096), (6, 7), (64, 128)])
def test_log_bucket_equals_transformers_for_every_distance(buckets, max_relative):
    distance = torch.arange(-4096, 4097)
    expected = make_log_bucket_position(distance, buckets, max_relative).long()
    assert torch.equal(log_bucket(distance, buckets, max_relative), expected)


@pytest.mark.parametrize("overrides", [
    dict(),  # DeBERTa-v3's shape: buckets, shared keys, c2p and p2c, layer-normed relative embeddings
    dict(position_buckets=4, max_relative_positions=12, share_att_key=False),
    dict(position_buckets=32, max_relative_positions=64, share_att_key=False, norm_rel_ebd="none"),
    dict(position_buckets=-1, max_relative_positions=10),  # no buckets: distances clamped to ±10
    dict(position_buckets=-1, max_relative_positions=-1),  # max_position_embeddings as the range
], ids=["v3", "buckets4-separate-keys", "buckets32-plain-rel-embeddings", "no-buckets", "no-range"])
def test_encoder_equals_transformers(tmp_path, overrides):
    encoder, _ = save_pair_rm(tmp_path, **overrides)
    model, _ = load_pair_rm(tmp_path)
    torch.manual_seed(1)
    ids = torch.randint(0, encoder.config.vocab_size, (3, 70))  # 70 tokens: past every bucket range above
    mask = torch.ones_like(ids)
    mask[1, 41:], mask[2, 6:] = 0, 0  # right padding
    with torch.no_grad():
        expected = encoder(ids, attention_mask=mask).last_hidden_state
        ours = model.encode(ids, mask)
    real = mask.bool()
    assert (ours[real] - expected[real]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Input rows, truncation and both-order scores: by hand, and against llm-blender itself.

PROMPTS = ["what is the sun", "tell me about the big red dog and the small blue cat on the mat", "hello",
           "why is the water blue", "who sat on the mat", "how long is a short answer", "one two three",
           "what is fire", "is it a bird or a fish", "the moon and the sun and the tree"]
PAIRS = [("it is a star", "the sun is a very big fire"), ("no", "the dog is big and red and the cat is small"),
         ("hello world", "hello"), ("the sky", "it is not"), ("the cat sat on the mat", "a dog"),
         ("short", "a very very long long answer about a tree and the water and a fish"), ("four", "three two one"),
         ("fire is hot", "what"), ("a bird", "a fish"), ("the sun", "the moon")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pair_rm")
    save_pair_rm(path)
    return path


def test_rows_by_hand(tiny_dir):
    judge = PairRMJudge.from_pretrained(str(tiny_dir))
    judge.source_max_length, judge.candidate_max_length = 8, 5
    tok = judge.tokenizer
    word = {w: tok.token_to_id("▁" + w) for w in WORDS}
    CLS, SEP, SRC, C1, C2 = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", *PREFIXES[:3]))
    ids, mask, positions = judge.group(["tell me about the big red dog", "hello"],
                                       [("the cat sat on the mat", "no"), ("yes", "hello world")])
    # Sources: at most 8 tokens with [CLS], <|source|> and [SEP]; the longest is 8, so the
    # candidates get 5 + (8 - 8) // 2 = 5 tokens: [CLS], their prefix, 2 words, [SEP].
    source0 = [CLS, SRC, word["tell"], word["me"], word["about"], word["the"], word["big"], SEP]
    cat, no = [word["the"], word["cat"], SEP], [word["no"], SEP]
    expected = [source0 + [CLS, C1] + cat + [CLS, C2] + no, [CLS, SRC, word["hello"], SEP] + [CLS, C1, word["yes"], SEP]
                + [CLS, C2, word["hello"], word["world"], SEP], source0 + [CLS, C1] + no + [CLS, C2] + cat,
                [CLS, SRC, word["hello"], SEP] + [CLS, C1, word["hello"], word["world"], SEP] + [CLS, C2, word["yes"], SEP]]
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == expected
    assert positions.tolist() == [[1, 9, 14], [1, 5, 9], [1, 9, 13], [1, 5, 10]]
    assert mask.sum(1).tolist() == [len(row) for row in expected] and ids[mask == 0].eq(0).all()


def test_score_by_hand_and_invariants(tiny_dir):
    judge = PairRMJudge.from_pretrained(str(tiny_dir))
    s = judge.preferences(PROMPTS, PAIRS)
    # One pair by the formulas: logit(A, B) from the prefix tokens' hidden states, both orders.
    ids, mask, positions = judge.group(PROMPTS[:1], PAIRS[:1])
    with torch.no_grad():
        h = judge.model.encode(ids, mask)
        logit = []
        for r in range(2):
            src, a, b = (h[r, p] for p in positions[r])
            head = judge.model.head
            logit.append(head(torch.cat([src, a])) - head(torch.cat([src, b])))
    assert torch.allclose(s[0], (logit[0] - logit[1])[0] / 2, atol=1e-6)
    swapped = judge.preferences(PROMPTS, [(b, a) for a, b in PAIRS])
    assert torch.allclose(swapped, -s, atol=1e-6)
    p = torch.tensor(judge.judge(PROMPTS, PAIRS, return_scores=True, temperature=0.5))
    p_swapped = torch.tensor(judge.judge(PROMPTS, [(b, a) for a, b in PAIRS], return_scores=True, temperature=0.5))
    assert torch.allclose(p + p_swapped, torch.ones(len(PAIRS)), atol=1e-6)
    assert torch.allclose(p, torch.sigmoid(4 * s), atol=1e-6)
    assert judge.judge(PROMPTS, PAIRS) == (s < 0).long().tolist() and 0 < sum(judge.judge(PROMPTS, PAIRS)) < len(PAIRS)
    # Order-independent: with no truncation at work, a pair's score does not depend on its batch.
    order = [3, 0, 9, 1, 7, 2, 8, 5, 4, 6]
    shuffled = judge.preferences([PROMPTS[i] for i in order], [PAIRS[i] for i in order])
    assert torch.allclose(shuffled, s[order], atol=1e-5)
    alone = torch.cat([judge.preferences([x], [pair]) for x, pair in zip(PROMPTS, PAIRS)])
    assert torch.allclose(alone, s, atol=1e-5)
    # Equal completions tie (up to batching's rounding); an exact tie goes to the first, as in TRL.
    assert judge.judge(["hello"], [("the sun", "the sun")], return_scores=True) == pytest.approx([0.5], abs=1e-5)
    judge.preferences = lambda prompts, pairs: torch.zeros(len(prompts))
    assert judge.judge(["hello"], [("the sun", "the moon")]) == [0]


def test_chunks_bound_the_attention_bias(tiny_dir, monkeypatch):
    judge = PairRMJudge.from_pretrained(str(tiny_dir))
    rows = []
    judge.model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    whole = judge.preferences(PROMPTS, PAIRS)
    assert [r[0] for r in rows] == [16, 4]  # 8 prompts x 2 orders, then the last 2
    for budget in (1, 3 * 4 * 30 * 30):  # elements of the [rows, 4 heads, N, N] bias
        rows.clear()
        monkeypatch.setattr("minidpo.pair_rm.BIAS_BUDGET", budget)
        assert torch.allclose(judge.preferences(PROMPTS, PAIRS), whole, atol=1e-5)
        assert all(r == 1 or r * 4 * n * n <= budget for r, n in rows) and sum(r for r, _ in rows) == 20
        assert len(rows) > 2 and max(r for r, _ in rows) == (1 if budget == 1 else 4)  # 4: the short last group
    assert judge.preferences([], []).shape == (0,)


def test_typed_prefix_tokens_and_sep_are_dropped(tiny_dir):
    judge = PairRMJudge.from_pretrained(str(tiny_dir))
    # Typed right after a word, a prefix token leaves the rest tokenized as without it.
    typed = [("the<|source|> cat", "a<|candidate2|><|candidate|> dog"), ("<|candidate1|>", "the[SEP]sun")]
    prompts = ["what<|candidate1|> is it", "hello"]
    ids, mask, _ = judge.group(prompts, typed)
    for token in PREFIXES[:3]:  # each prefix token once per row, where the scores are read
        assert (ids == judge.tokenizer.token_to_id(token)).sum(1).tolist() == [1] * 4
    assert (ids == judge.tokenizer.token_to_id(PREFIXES[3])).sum() == 0
    plain_ids, plain_mask, _ = judge.group(["what is it", "hello"], [("the cat", "a dog"), ("", "the sun")])
    assert torch.equal(ids, plain_ids) and torch.equal(mask, plain_mask)


def test_conversational_prompts_are_read_as_text(tiny_dir):
    judge = make_judge("pair_rm", path=str(tiny_dir))
    chat = [[{"role": "user", "content": "what is the sun"}]]
    assert judge.judge(chat, PAIRS[:1], return_scores=True) == judge.judge(["User: what is the sun"], PAIRS[:1],
                                                                          return_scores=True)


@pytest.fixture(scope="module")
def llm_blender():
    """llm-blender's pair_ranker collator and ranker, imported without the package's __init__ (it
    imports the whole LLM-Blender pipeline and its dependencies, which these two modules do not need)."""
    spec = importlib.util.find_spec("llm_blender")
    if spec is None:
        pytest.skip("llm-blender is not installed (pip install --no-deps llm-blender)")
    saved = {name: module for name, module in sys.modules.items() if name.startswith("llm_blender")}
    package = types.ModuleType("llm_blender")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["llm_blender"] = package
    try:
        yield (importlib.import_module("llm_blender.pair_ranker.collator"),
               importlib.import_module("llm_blender.pair_ranker.ranker"))
    finally:
        for name in [n for n in sys.modules if n.startswith("llm_blender")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("layout", ["hf", "pairrm"])
@pytest.mark.parametrize("lengths", [(1224, 412), (9, 4)], ids=["pairrm-lengths", "truncating"])
def test_equals_llm_blender(tmp_path, llm_blender, layout, lengths):
    """The both-order score of every pair equals llm-blender's rank(..., return_scores=True) path:
    its CrossCompareCollator in batches of 8, CrossCompareReranker._full_predict, and the
    max_logits scores (mean over the comparison matrix's row minus its column)."""
    collator_module, ranker_module = llm_blender
    encoder, head = save_pair_rm(tmp_path, layout)
    source_max, candidate_max = lengths
    judge = PairRMJudge.from_pretrained(str(tmp_path))
    judge.source_max_length, judge.candidate_max_length = source_max, candidate_max

    tokenizer = T.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), cls_token="[CLS]",
                                          sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    tokenizer.batch_encode_plus = tokenizer.__call__  # transformers 5 dropped the name llm-blender calls
    collator = collator_module.CrossCompareCollator(source_max, tokenizer, candidate_max)
    encoder.config.out_hidden_state_size = encoder.config.hidden_size
    args = types.SimpleNamespace(n_tasks=1, num_pos=1, num_neg=1, sub_sampling_mode="all_pair", sub_sampling_ratio=0.5,
                                 loss_type="instructgpt", drop_out=0.0, inference_mode="full")
    ranker = ranker_module.CrossCompareReranker(encoder, args, tokenizer).eval()
    ranker.load_state_dict({**{f"pretrained_model.{k}": v for k, v in encoder.state_dict().items()}, **head})
    expected = []
    with torch.no_grad():
        for start in range(0, len(PROMPTS), 8):
            batch = collator([{"source": p, "candidates": list(pair)}
                              for p, pair in zip(PROMPTS[start:start + 8], PAIRS[start:start + 8])])
            compare = ranker._full_predict(**{k: v for k, v in batch.items() if v is not None})["logits"]
            expected.append((compare - compare.transpose(1, 2)).mean(-1)[:, 0])  # scores[:, 0] = s
    expected = torch.cat(expected)
    assert torch.allclose(judge.preferences(PROMPTS, PAIRS), expected, atol=1e-5)
    # TRL's return_scores: softmax over the two scores [s, -s] divided by the temperature.
    p = torch.softmax(torch.stack([expected, -expected], 1) / 0.7, 1)[:, 0]
    assert torch.allclose(torch.tensor(judge.judge(PROMPTS, PAIRS, return_scores=True, temperature=0.7)), p, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad directories: one line naming what is wrong.


def one_line_error(path) -> str:
    with pytest.raises(ValueError) as info:
        PairRMJudge.from_pretrained(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_directories(tmp_path, world):
    assert "not a PairRM directory" in one_line_error(world["llama"])
    bad = tmp_path / "bad"
    save_pair_rm(bad)
    (bad / "tokenizer.json").unlink()
    assert "tokenizer.json: no PairRM tokenizer" in one_line_error(bad)
    save_tokenizer(bad, prefixes=PREFIXES[:2])
    assert "has no <|candidate2|> token" in one_line_error(bad)
    save_tokenizer(bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "position_biased_input": True}))
    assert "position_biased_input=True is not supported" in one_line_error(bad)
    (bad / "config.json").write_text(json.dumps({**config, "pos_att_type": ["c2p"]}))
    assert "pos_att_type=['c2p'] is not supported" in one_line_error(bad)
    (bad / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(bad / "model.safetensors"))
    name = "pretrained_model.encoder.layer.1.attention.self.key_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(bad / "model.safetensors"))
    assert f"tensor {name} is missing" in one_line_error(bad)
    save_file({**tensors, name: tensors[name][:3]}, str(bad / "model.safetensors"))
    assert f"tensor {name} has shape (3, 32)" in one_line_error(bad)
    (bad / "model.safetensors").unlink()
    assert "model.safetensors is not a readable safetensors file" in one_line_error(bad)


# ---------------------------------------------------------------------------------------------
# Real weights (opt-in) and the trainer.


@pytest.mark.skipif(not os.environ.get("MINIDPO_PAIRRM_DIR"), reason="set MINIDPO_PAIRRM_DIR to a PairRM directory")
def test_real_pair_rm_weights():
    """TRL's own expectations of PairRM, on the real weights (either layout)."""
    judge = PairRMJudge.from_pretrained(os.environ["MINIDPO_PAIRRM_DIR"])
    prompts = ["The capital of France is", "The biggest planet in the solar system is"]
    pairs = [("Paris", "Marseille"), ("Saturn", "Jupiter")]
    assert judge.judge(prompts, pairs) == [0, 1]
    p = judge.judge(prompts, pairs, return_scores=True)
    assert p[0] > 0.5 > p[1]


def test_train_with_pair_rm(world, tmp_path):
    judge_dir = tmp_path / "pair_rm"
    save_pair_rm(judge_dir)
    out = tmp_path / "out"
    assert run(base(world, out, "--judge", "pair_rm", "--judge_model", judge_dir, "--max_steps", 2,
                    "--per_device_train_batch_size", 4)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["judge/undecided"] == 0 and r["rewards/margins"] == r["rewards/margins"] for r in rows)
