"""minidpo.judges: reward-model scores against transformers, the LLM judge on the offline SmolLM2,
the OpenAI judge against a real HTTP server on 127.0.0.1, rule judges, reward functions, the registry."""

import http.server
import json
import random
import threading
import time

import pytest
import torch
import transformers as T
from tokenizers import processors

import minidpo
from minidpo.judges import (JudgeError, KeywordJudge, LLMJudge, OpenAIJudge, RewardFunctions,
                            RewardModel, RewardModelJudge, ShorterJudge, load_reward_function, make_judge,
                            prompt_text, shuffle_pairs)
from minidpo.tokenizer import Tokenizer
from tokenizer_world import byte_level_bpe

# ---------------------------------------------------------------------------------------------
# Reward model: scores equal transformers' AutoModelForSequenceClassification on the same text.

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForSequenceClassification, dict(num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForSequenceClassification, dict(num_key_value_heads=2)),
    "neox": (T.GPTNeoXConfig, T.GPTNeoXForSequenceClassification, dict(rotary_pct=0.25)),
}
# ChatML with a BOS written by the template itself: encoding the rendered chat with special tokens
# would double it, which these tests would notice.
CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "hello, who are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the quick brown fox"},
     {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "over what?"}],
    [{"role": "user", "content": "count: 1 2 3"}],
]
TEXTS = ["Question: hello, who are you?\nAnswer:", "the quick brown fox", "count: 1 2 3 and"]
COMPLETIONS = ["I am a small model that answers questions.", " jumps over the lazy dog", " 4 5 6 7 8 9 10"]


@pytest.fixture(scope="module")
def reward_tokenizer():
    words = "the quick brown fox jumps over lazy dog hello who are you answer question model small count".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) + f" {i}." for i in range(200)]
    tok = byte_level_bpe(corpus, 400, ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"])
    # A BOS-adding post-processor, so plain-text rows get one from the tokenizer.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= VOCAB
    return Tokenizer(tok, {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}, CHATML)


def reward_model_dir(path, family, tokenizer):
    config_cls, model_cls, extra = FAMILIES[family]
    ref = model_cls(config_cls(**COMMON, **extra, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + (1.0 if "embed" in name else 0.15) * torch.randn(p.shape, generator=g))
    ref.save_pretrained(path)
    tokenizer.save(path)
    return ref.eval()


def reference_scores(path, ref, prompts, completions, max_length=None):
    """transformers' tokenizer and model on each row alone (no padding at all): the true scores.
    PreTrainedTokenizerFast, not AutoTokenizer: next to a Qwen2 config.json, AutoTokenizer picks
    Qwen2Tokenizer, which replaces this test tokenizer's pre-tokenizer with Qwen2's own."""
    hf = T.PreTrainedTokenizerFast.from_pretrained(path)
    scores = []
    for prompt, completion in zip(prompts, completions):
        if isinstance(prompt, str):
            ids = hf(prompt + completion)["input_ids"]
        else:
            messages = prompt + [{"role": "assistant", "content": completion}]
            ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        ids = ids[-max_length:] if max_length else ids
        with torch.no_grad():
            scores.append(ref(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return torch.tensor(scores)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_scores_match_transformers(tmp_path, reward_tokenizer, family):
    ref = reward_model_dir(tmp_path, family, reward_tokenizer)
    # batch_size 2 for 3 rows: two mini-batches, the second of another width.
    scorer = RewardModel.from_pretrained(str(tmp_path), batch_size=2)
    for prompts in (CONVERSATIONS, TEXTS):
        ours = scorer(prompts, COMPLETIONS)
        theirs = reference_scores(tmp_path, ref, prompts, COMPLETIONS)
        assert ours.shape == (3,) and ours.dtype == torch.float32
        assert (ours - theirs).abs().max().item() <= 1e-4, (ours, theirs)
        assert theirs.std().item() > 1e-2  # rows differ: reading the wrong token or text would show


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_prompts_completions_share_one_packed_row(tmp_path, reward_tokenizer, family, monkeypatch):
    # A prompt's n completions, one after another as the trainer passes them, are scored in one row
    # (their common tokens once); the scores are still those of each text alone. Uneven runs of a
    # prompt's rows are scored a row each; a repeated text gets exactly its first copy's score.
    ref = reward_model_dir(tmp_path, family, reward_tokenizer)
    scorer = RewardModel.from_pretrained(str(tmp_path))
    rows_seen = []
    forward = scorer.model.forward
    monkeypatch.setattr(scorer.model, "forward", lambda ids, **kw: rows_seen.append(ids.shape[0]) or forward(ids, **kw))
    for prompts, completions, packed_rows in [
            ([p for p in CONVERSATIONS for _ in range(2)], [c for _ in range(2) for c in COMPLETIONS], 3),
            ([TEXTS[0]] * 3 + [TEXTS[1]] * 2, COMPLETIONS + COMPLETIONS[:2], 5),
            ([TEXTS[2]] * 3, [COMPLETIONS[0], COMPLETIONS[1], COMPLETIONS[0]], 1)]:
        rows_seen.clear()
        ours = scorer(prompts, completions)
        assert (ours - reference_scores(tmp_path, ref, prompts, completions)).abs().max().item() <= 1e-4
        assert rows_seen == [packed_rows]
    assert ours[0] == ours[2] != ours[1]


def test_reward_truncates_from_the_left(tmp_path, reward_tokenizer):
    ref = reward_model_dir(tmp_path, "llama", reward_tokenizer)
    scorer = RewardModel.from_pretrained(str(tmp_path), max_length=12)
    ours = scorer(CONVERSATIONS, COMPLETIONS)
    assert (ours - reference_scores(tmp_path, ref, CONVERSATIONS, COMPLETIONS, max_length=12)).abs().max() <= 1e-4
    assert (ours - reference_scores(tmp_path, ref, CONVERSATIONS, COMPLETIONS)).abs().max() > 1e-2


def test_reward_model_judge(tmp_path, reward_tokenizer):
    reward_model_dir(tmp_path, "qwen2", reward_tokenizer)
    scorer = RewardModel.from_pretrained(str(tmp_path))
    judge = RewardModelJudge(scorer)
    pairs = [(COMPLETIONS[0], COMPLETIONS[1]), (COMPLETIONS[1], COMPLETIONS[0]), (COMPLETIONS[2], COMPLETIONS[2])]
    prompts = [TEXTS[0]] * 3
    a, b = scorer(TEXTS[:1] * 2, COMPLETIONS[:2]).tolist()
    assert judge.judge(prompts, pairs) == [int(b > a), int(a > b), -1]


def test_reward_model_needs_one_label(tmp_path, reward_tokenizer):
    T.LlamaForSequenceClassification(T.LlamaConfig(**COMMON, num_labels=2, pad_token_id=0)).save_pretrained(tmp_path)
    reward_tokenizer.save(tmp_path)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModel.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# LLM judge on the real offline SmolLM2-135M-Instruct.

# A short and a long correct answer: "shorter" and "more detailed" disagree on every pair.
LENGTH_PAIRS = [
    ("What is the capital of France?", "Paris.",
     "The capital of France is Paris, a city on the Seine known for the Eiffel Tower, the Louvre museum, and its "
     "long history as a center of art, fashion and politics."),
    ("How many legs does a spider have?", "Eight.",
     "A spider has eight legs. Spiders are arachnids, not insects, and all arachnids have four pairs of jointed "
     "legs attached to the front part of the body, the cephalothorax."),
    ("What color is the sky on a clear day?", "Blue.",
     "On a clear day the sky looks blue because molecules in the air scatter short blue wavelengths of sunlight "
     "much more strongly than the longer red wavelengths, an effect called Rayleigh scattering."),
    ("What is 2 + 2?", "4.",
     "2 + 2 equals 4. Adding two and two means counting two more after two: three, four. So the sum is four, "
     "which is also 2 times 2."),
    ("Who wrote Romeo and Juliet?", "Shakespeare.",
     "Romeo and Juliet was written by William Shakespeare, the English playwright, around 1595. It is a tragedy "
     "about two young lovers from feuding families in Verona."),
    ("What is the boiling point of water?", "100 °C.",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea-level pressure. At higher altitudes the "
     "air pressure is lower, so water boils at a lower temperature."),
    ("What is the largest planet?", "Jupiter.",
     "The largest planet in our solar system is Jupiter, a gas giant more than eleven times as wide as Earth and "
     "more massive than all the other planets combined."),
    ("What do bees make?", "Honey.",
     "Bees make honey from the nectar of flowers. They collect nectar, store it in their honey stomach, and back "
     "in the hive they evaporate water from it until it becomes thick honey stored in wax combs."),
]
MORE_LENGTH_PAIRS = [
    ("What is the freezing point of water?", "0 °C.",
     "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit, at normal atmospheric pressure; salt "
     "water freezes at a slightly lower temperature."),
    ("What is the chemical symbol for gold?", "Au.",
     "The chemical symbol for gold is Au, from the Latin word aurum, meaning shining dawn. Gold is element number "
     "79 in the periodic table."),
    ("How many days are in a week?", "Seven.",
     "There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday, a cycle "
     "that goes back to ancient Babylon."),
    ("What is the opposite of hot?", "Cold.",
     "The opposite of hot is cold. Hot describes a high temperature, such as boiling water or a summer afternoon, "
     "while cold describes a low one, like ice or snow."),
    ("Which animal says moo?", "A cow.",
     "The animal that says moo is the cow. Cows moo to call their calves, to find the rest of the herd, or when "
     "they are hungry and want to be fed."),
    ("What gas do plants absorb?", "Carbon dioxide.",
     "Plants absorb carbon dioxide from the air through small pores in their leaves, and use it with water and "
     "sunlight to make sugar in photosynthesis, releasing oxygen."),
    ("What is the square root of 9?", "3.",
     "The square root of 9 is 3, because 3 multiplied by itself gives 9. Strictly speaking -3 squared is also 9, "
     "but the principal square root is the positive one."),
    ("What is the tallest animal?", "The giraffe.",
     "The tallest animal is the giraffe, which can grow to about 5.5 metres. Its long neck lets it eat leaves "
     "high up in acacia trees that other animals cannot reach."),
]


@pytest.fixture(scope="module")
def smollm2(offline_model_dir):
    return minidpo.load_pretrained(str(offline_model_dir))


@pytest.fixture(scope="module")
def smollm2_tokenizer(offline_model_dir):
    return Tokenizer.from_dir(offline_model_dir)


class PlantedModel(torch.nn.Module):
    """A fake judge model with a planted position bias: 5 nats towards the first label, whatever the
    prompt says. Given a keyword, also 1 nat towards the label of the response that contains it."""

    def __init__(self, tokenizer, keyword=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the judge a device to read
        self.tokenizer, self.keyword = tokenizer, keyword
        self.label_a, self.label_b = (tokenizer.encode(label, add_special_tokens=False)[0] for label in "AB")

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, self.tokenizer.vocab_size)
        logits[..., self.label_a] = 5.0
        for row, text in enumerate(self.tokenizer.batch_decode(input_ids.tolist())):
            if self.keyword and self.keyword in text:
                in_first = self.keyword in text.split("## Response B")[0]
                logits[row, 0, self.label_a if in_first else self.label_b] += 1.0
        return logits


def test_llm_judge_labels_must_be_single_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = PlantedModel(tok)
    with pytest.raises(ValueError, match=r"' 0' is 2 tokens"):
        LLMJudge(model, tok, labels=(" 0", " 1"))  # SmolLM2 splits " 0" into a space and a digit
    assert LLMJudge(model, tok, labels=("0", "1")).label_ids == [tok.encode("0")[0], tok.encode("1")[0]]


def test_shuffling_or_both_orders_remove_a_planted_position_bias(smollm2_tokenizer):
    tok = smollm2_tokenizer
    biased = PlantedModel(tok)
    prompts, pairs = ["Say something."] * 200, [("Hello.", "Hello.")] * 200
    # Shown once, in the order given: always the first shown, completion 0.
    once = LLMJudge(biased, tok, both_orders=False, seed=3)
    assert once.judge(prompts, pairs, shuffle_order=False) == [0] * 200
    # Shown once, shuffled: whichever completion was shown first, 0 unless the pair was swapped.
    verdicts = once.judge(prompts, pairs, shuffle_order=True)
    _, swapped = shuffle_pairs(pairs, random.Random(3))
    assert verdicts == [int(s) for s in swapped]
    assert 70 <= verdicts.count(0) <= 130  # about half, no longer always completion 0
    # Shown both ways (the default): a preference for a position alone cancels, so every pair is undecided.
    assert LLMJudge(biased, tok).judge(prompts[:4], pairs[:4]) == [-1] * 4
    # A margin wider than any gap leaves every pair undecided when shown once too.
    assert LLMJudge(biased, tok, margin=10.0, both_orders=False).judge(prompts[:4], pairs[:4]) == [-1] * 4

    # The position bias and a 5x weaker content preference (for "Yes"): shown both ways, the verdict
    # follows the content alone, 2 nats either way; shown once, the position wins every time.
    biased = PlantedModel(tok, keyword="Yes")
    pairs = [("Yes, gladly.", "No."), ("No.", "Yes, gladly."), ("Yes.", "Yes!"), ("No.", "Nope.")]
    judge = LLMJudge(biased, tok)
    assert judge.preferences(prompts[:4], pairs).tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0], abs=1e-5)
    assert judge.judge(prompts[:4], pairs) == [0, 1, -1, -1]
    assert judge.judge(prompts[:4], pairs, shuffle_order=False) == [0, 1, -1, -1]  # moot with both orders
    assert LLMJudge(biased, tok, both_orders=False).judge(prompts[:4], pairs, shuffle_order=False) == [0] * 4


@pytest.mark.slow
def test_llm_judge_real_model_position_bias_and_shuffle(smollm2):
    """SmolLM2-135M has a strong position bias of its own. Measured: shown once without shuffling it
    names the first response in 16/16 presentations here (32/32 on 16 pairs), each pair in both
    orders, so its verdicts contradict themselves on every pair; with shuffling completion 0 won 9/16
    (20/32). Shown both ways (the default) its verdicts contradict themselves on no pair: judging a
    swapped pair gives exactly the swapped verdict (one pair here, 2 + 2, is within the margin both
    ways: 0.001 nats)."""
    model, tok = smollm2
    judge = LLMJudge(model, tok, seed=0, both_orders=False)
    prompts = [q for q, _, _ in LENGTH_PAIRS] * 2
    pairs = [(s, l) for _, s, l in LENGTH_PAIRS] + [(l, s) for _, s, l in LENGTH_PAIRS]
    plain = judge.judge(prompts, pairs, shuffle_order=False)
    assert set(plain) <= {-1, 0, 1}
    assert plain.count(0) >= 14, plain
    shuffled = judge.judge(prompts, pairs, shuffle_order=True)
    assert set(shuffled) <= {-1, 0, 1}
    assert 4 <= shuffled.count(0) <= 12, shuffled
    both = LLMJudge(model, tok).judge(prompts, pairs)
    assert both[:8] == [-1 if v == -1 else 1 - v for v in both[8:]] and both.count(-1) <= 4, both


@pytest.mark.slow
def test_llm_judge_instruction_moves_its_preference(smollm2):
    """The paper's controllable feedback, measured honestly at 135M parameters, on 16 pairs where
    "shorter" and "longer" disagree on every pair.

    Shown both ways (the default), the position bias cancels and the verdicts come from the content;
    "Which response is shorter?" then moves the preference (preferences()) towards the short answer,
    compared with "Which response is longer?", on 15/16 pairs. But the move is small (mean 0.12
    nats) next to how much the model leans to one answer of a pair whatever it is asked (up to 0.8
    nats, mostly to the long one with labels A/B, mostly to the short one with X/Y), so the verdicts
    follow that lean: the short answer wins 4/16 under "shorter" and 2/16 under "longer", i.e. 25%
    and 88% agreement with the instruction; the instruction flips 2 verdicts of 16. Shown once, the
    position decides instead: 17/32 and 16/32 (53% and 50%) with each pair in both orders, 28/48 and
    22/48 (58% and 46%) shuffled with 3 seeds. Other phrasings and labels (fewer/more words,
    concise/detailed, the instruction also as the system message, an answer prefix, labels 1/2, X/Y,
    a/b, P/Q) reached at best 11/16 under each instruction (labels 1/2 and X/Y averaged), and criteria
    (English/French, polite/rude, positive/negative, correct/wrong) did no better: feedback that
    follows the instruction needs a larger judge model. What holds at 135M: the instruction moves
    the preference the right way, and it never moves a verdict the wrong way.
    """
    model, tok = smollm2
    rows = LENGTH_PAIRS + MORE_LENGTH_PAIRS
    prompts, short_first = [q for q, _, _ in rows], [(s, l) for _, s, l in rows]

    def prefers_short(instruction):
        return LLMJudge(model, tok, instruction=instruction).preferences(prompts, short_first)

    to_short, to_long = prefers_short("Which response is shorter?"), prefers_short("Which response is longer?")
    shift = to_short - to_long  # > 0: "shorter" leans more to the short answer than "longer" does
    assert (shift > 0).sum().item() >= 14, shift
    # judge()'s verdicts (its margin rule is tested on the planted model): wherever the short answer
    # wins under "longer" it also wins under "shorter", and it wins more often under "shorter".
    margin = LLMJudge(model, tok).margin
    short_wins, short_wins_anyway = (to_short > margin).tolist(), (to_long > margin).tolist()
    assert all(s or not a for s, a in zip(short_wins, short_wins_anyway)), (to_short, to_long)
    assert sum(short_wins) > sum(short_wins_anyway), (to_short, to_long)


@pytest.mark.slow
def test_llm_judge_batch_equals_rows_alone(smollm2):
    """Rows of different lengths share one left-padded forward; each reads what it would alone."""
    model, tok = smollm2
    prompts, pairs = [q for q, _, _ in LENGTH_PAIRS[:3]], [(s, l) for _, s, l in LENGTH_PAIRS[:3]]
    batched = LLMJudge(model, tok).label_logprobs(prompts, pairs)
    alone = LLMJudge(model, tok, batch_size=1).label_logprobs(prompts, pairs)
    assert (batched - alone).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible judge against a local server.


class Endpoint:
    """A chat-completions server on 127.0.0.1 (port 0). `respond(n, body)` gives the n-th request's
    (HTTP status, reply content, seconds to wait first); content None sends a body that is not JSON."""

    def __init__(self, respond):
        self.respond, self.requests, self.active, self.max_active = respond, [], 0, 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    n = len(endpoint.requests)
                    endpoint.requests.append((self.path, dict(self.headers), body))
                    endpoint.active += 1
                    endpoint.max_active = max(endpoint.max_active, endpoint.active)
                status, content, delay = endpoint.respond(n, body)
                time.sleep(delay)
                with endpoint.lock:
                    endpoint.active -= 1
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode() if content is not None else b"<html>oops</html>"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    servers = []

    def start(respond):
        servers.append(Endpoint(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def openai_judge(url, **kw):
    return OpenAIJudge(model="judge-model", base_url=url, api_key_env="MINIDPO_TEST_KEY",
                       **{"timeout": 5.0, "max_retries": 2, "backoff": 0.001, **kw})


def test_openai_request_shape_and_parsing(endpoint, monkeypatch):
    monkeypatch.setenv("MINIDPO_TEST_KEY", "sk-test")
    server = endpoint(lambda n, body: (200, "1", 0))
    judge = openai_judge(server.url, instruction="Prefer the answer about cats.")
    prompts = ["What is 2+2?", [{"role": "user", "content": "Name a pet."}]]
    assert judge.judge(prompts, [("4", "5"), ("a cat", "a dog")], shuffle_order=False) == [1, 1]
    assert len(server.requests) == 2
    by_prompt = {body["messages"][0]["content"].split("\n")[1]: (path, headers, body)
                 for path, headers, body in server.requests}
    path, headers, body = by_prompt["User: Name a pet."]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and [m["role"] for m in body["messages"]] == ["user"]
    content = body["messages"][0]["content"]
    assert content.index("a cat") < content.index("a dog") and "Prefer the answer about cats." in content
    assert judge.failures == 0

    # Shuffled: the server always answers "0" (the first shown), which maps back through the swaps.
    monkeypatch.delenv("MINIDPO_TEST_KEY")
    server = endpoint(lambda n, body: (200, "0", 0))
    pairs = [(f"answer {i}", f"other {i}") for i in range(20)]
    verdicts = openai_judge(server.url, seed=5).judge(["q"] * 20, pairs)
    _, swapped = shuffle_pairs(pairs, random.Random(5))
    assert verdicts == [int(s) for s in swapped] and 0 < sum(swapped) < 20
    assert all("Authorization" not in headers for _, headers, _ in server.requests)  # no key, no header


def test_openai_unparseable_reply_is_undecided(endpoint):
    replies = {"first": " 1\n", "second": "Response 0 is better", "third": ""}
    server = endpoint(lambda n, body: (200, next(r for k, r in replies.items()
                                                 if k in body["messages"][0]["content"]), 0))
    judge = openai_judge(server.url)
    assert judge.judge(["q"] * 3, [(k, "x") for k in replies], shuffle_order=False) == [1, -1, -1]
    assert judge.failures == 0


@pytest.mark.parametrize("status", [500, 429])
def test_openai_retries_a_server_error(endpoint, status):
    server = endpoint(lambda n, body: (status, None, 0) if n == 0 else (200, "0", 0))
    judge = openai_judge(server.url)
    assert judge.judge(["q"], [("a", "b")], shuffle_order=False) == [0]
    assert len(server.requests) == 2 and judge.failures == 0


def test_openai_retries_a_timeout(endpoint):
    server = endpoint(lambda n, body: (200, "1", 1.0 if n == 0 else 0))
    judge = openai_judge(server.url, timeout=0.3)
    assert judge.judge(["q"], [("a", "b")], shuffle_order=False) == [1]
    assert len(server.requests) == 2 and judge.failures == 0


def test_openai_one_failing_pair_is_undecided(endpoint):
    server = endpoint(lambda n, body: (500, None, 0) if "bad" in body["messages"][0]["content"] else (200, "1", 0))
    judge = openai_judge(server.url)
    assert judge.judge(["q"] * 3, [("a", "b"), ("bad", "b"), ("c", "d")], shuffle_order=False) == [1, -1, 1]
    assert judge.failures == 1
    assert len(server.requests) == 2 + 3  # the bad pair: one try and two retries


def test_openai_every_pair_failing_raises(endpoint):
    server = endpoint(lambda n, body: (503, None, 0))
    judge = openai_judge(server.url)
    with pytest.raises(JudgeError) as info:
        judge.judge(["q"] * 2, [("a", "b"), ("c", "d")])
    message = str(info.value)
    assert "\n" not in message and server.url in message and "HTTP 503" in message
    assert len(server.requests) == 2 * 3 and judge.failures == 2

    # A rejected key is not retried, and the message says which variable to set.
    server = endpoint(lambda n, body: (401, None, 0))
    with pytest.raises(JudgeError, match=r"HTTP 401.*MINIDPO_TEST_KEY"):
        openai_judge(server.url).judge(["q"], [("a", "b")])
    assert len(server.requests) == 1

    # A 200 that is not a chat-completions reply with text is a failure too.
    for content in (None, [{"type": "text", "text": "1"}]):  # not JSON; a list of content parts
        server = endpoint(lambda n, body: (200, content, 0))
        with pytest.raises(JudgeError, match="not a chat-completions reply"):
            openai_judge(server.url).judge(["q"], [("a", "b")])

    # Nothing listening at all.
    port = server.server.server_address[1]
    server.close()
    with pytest.raises(JudgeError, match="ConnectionRefusedError"):
        openai_judge(f"http://127.0.0.1:{port}/v1", max_retries=1).judge(["q"], [("a", "b")])


def test_openai_requests_overlap(endpoint):
    server = endpoint(lambda n, body: (200, "0", 0.3))
    judge = openai_judge(server.url, max_workers=4)
    assert judge.judge(["q"] * 4, [("a", "b")] * 4, shuffle_order=False) == [0] * 4
    assert server.max_active >= 2  # 4 workers: the requests were in flight together


# ---------------------------------------------------------------------------------------------
# Rule judges, reward functions, the registry.


def test_rule_judges():
    pairs = [("short", "a longer one"), ("a longer one, please", "short"), ("same", "same")]
    assert ShorterJudge().judge(["q"] * 3, pairs) == [0, 1, -1]
    # The keyword and the length disagree on the second pair.
    assert KeywordJudge("Please").judge(["q"] * 3, pairs) == [-1, 0, -1]


def test_prompt_text():
    assert prompt_text("plain") == "plain"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prompt_text(conversation) == "System: Be brief.\n\nUser: Hi"


def test_reward_functions_combine():
    def length(prompts, completions, **kwargs):
        return [len(c) for c in completions]

    def has_please(prompts, completions, bonus=1.0, **kwargs):
        return [bonus if "please" in c else None for c in completions]  # None: no opinion

    rewards = RewardFunctions([length, has_please], weights=[1.0, 0.5])
    scores = rewards(["q", "q"], ["abc", "please"], bonus=4.0)
    assert scores.tolist() == [3.0, 6.0 + 0.5 * 4.0]
    assert RewardFunctions([length])(["q"], ["abcd"]).tolist() == [4.0]
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        RewardFunctions([length], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        RewardFunctions([lambda prompts, completions: [0.0]])(["q", "q"], ["a", "b"])


def test_load_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n"
                                            "    return [-len(c) for c in completions]\n")
    from_file = load_reward_function(f"{tmp_path / 'my_rewards.py'}:brevity")
    assert from_file(["q"], ["abc"]) == [-3]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_function("my_rewards:brevity")(["q"], ["ab"]) == [-2]
    with pytest.raises(ValueError, match="should look like"):
        load_reward_function("my_rewards")
    with pytest.raises(ValueError, match="no callable named 'missing'"):
        load_reward_function("my_rewards:missing")
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        load_reward_function("nowhere.py:f")


def test_make_judge():
    assert isinstance(make_judge("shorter"), ShorterJudge)
    assert make_judge("keyword", keyword="thanks").keyword == "thanks"
    judge = make_judge("openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert isinstance(judge, OpenAIJudge) and judge.url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(ValueError) as info:
        make_judge("nope")
    message = str(info.value)
    assert "\n" not in message and "unknown judge 'nope'" in message and "shorter" in message and "pair_rm" in message
