"""Preference feedback for online DPO: which of two sampled completions is better.

- A pairwise judge names the better of a prompt's two completions: 0 or 1, or -1 when undecided (a tie, an
  unreadable answer, a request failed after every retry). Rule judges need nothing external; LLMJudge asks a
  local instruct model (the paper's "LLM annotator"), OpenAIJudge a chat-completions endpoint, PairRMJudge
  (pair_rm.py) llm-blender's PairRM, the reference's default.
- Pointwise scores (RewardModel, RewardFunctions) rate each completion alone. Preference turns either kind
  into the rollout's chosen and rejected completions.

The trainer drops undecided pairs from the loss and counts them, so one bad judgment never stops a run; an endpoint
that is down ends it (OpenAIJudge's JudgeError) rather than train on nothing. Judges read prompts as plain text
(prompt_text); only the reward model renders a conversation with its chat template: the text it learned to score."""

import concurrent.futures
import contextlib
import http.client
import importlib.util
import itertools
import json
import math
import os
import random
import socket
import sys
import threading
import time
import urllib.parse

import torch

from .checkpoint import load_pretrained
from .packing import pack_shared_prefixes

DEFAULT_INSTRUCTION = "Which response answers the question better: more helpful, correct and concise?"


class JudgeError(RuntimeError):
    """A judge could not judge any pair of a call."""


def prompt_text(prompt) -> str:
    """A prompt as plain text: a string as it is, a conversation as "Role: content" paragraphs."""
    return prompt if isinstance(prompt, str) else "\n\n".join(
        f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def shuffle_pairs(pairs, rng: random.Random, shuffle: bool = True):
    """Each pair in a random order (if `shuffle`), and which were swapped. Model judges tend to prefer one
    position (often the first): random order turns that bias into noise, not a preference for completion 0."""
    swapped = [shuffle and rng.random() < 0.5 for _ in pairs]
    return [(b, a) if s else (a, b) for (a, b), s in zip(pairs, swapped)], swapped


def unshuffle(verdicts, swapped) -> list[int]:
    """Verdicts about shuffled pairs, mapped back to the original order (-1 stays -1)."""
    return [1 - v if s and v != -1 else v for v, s in zip(verdicts, swapped)]


def comparison(prompt, first: str, second: str, instruction: str, labels: tuple[str, str]) -> str:
    """The question a model judge answers about one pair, its responses named by the labels. The instruction comes
    last, where small judges follow it more (measured on SmolLM2-135M; see tests/test_judges.py)."""
    return (f"## Question\n{prompt_text(prompt)}\n\n## Response {labels[0]}\n{first}\n\n"
            f"## Response {labels[1]}\n{second}\n\n{instruction} Reply with {labels[0]} or {labels[1]} only.")


class PairwiseJudge:
    """judge() returns, per prompt, the index (0 or 1) of its pair's better completion, or -1 when undecided.
    shuffle_order asks judges that see both at once to show each pair in random order (shuffle_pairs)."""

    def judge(self, prompts: list, completion_pairs: list[tuple[str, str]], shuffle_order: bool = True) -> list[int]:
        raise NotImplementedError


class ScoreJudge(PairwiseJudge):
    """Scores each (prompt, completion) alone: higher wins, -1 on a tie; shuffle_order is moot (no position bias)."""

    def judge(self, prompts, completion_pairs, shuffle_order=True):
        scores = self.scores([p for p in prompts for _ in range(2)], [c for pair in completion_pairs for c in pair])
        return [-1 if a == b else int(b > a) for a, b in zip(scores[::2], scores[1::2])]


# Rule judges, for demos and tests.


class ShorterJudge(ScoreJudge):
    """Prefers the completion with fewer characters; -1 when both are as long. A completion cut off
    at max_new_tokens (no EOS) is usually the longer one, so this also favours finished answers."""

    def scores(self, prompts, completions):
        return [-len(c) for c in completions]


class KeywordJudge(ScoreJudge):
    """Prefers the completion that contains `keyword` (case-insensitive); -1 when both or neither do."""

    def __init__(self, keyword: str = "please"):
        self.keyword = keyword.lower()

    def scores(self, prompts, completions):
        return [self.keyword in c.lower() for c in completions]


def brevity(prompts, completions, **kwargs) -> list[float]:
    """The offline demo's rule reward: -len(completion) / 100 (TRL passes a conversational one as messages)."""
    return [-len(c if isinstance(c, str) else c[-1]["content"]) / 100 for c in completions]


class Pretrained:
    """A class built from (model, tokenizer) and options; from_pretrained loads the pair (load_pretrained)."""

    @classmethod
    def from_pretrained(cls, path: str = "offline:SmolLM2-135M-Instruct", dtype=None, device=None, **options):
        model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
        return cls(model, tokenizer, **options)


# Pointwise scores: a tensor [N] for N (prompt, completion) rows.


class RewardModel(Pretrained):
    """A sequence-classification model (num_labels=1) scoring prompt + completion as its own tokenizer renders them
    (Tokenizer.render, as in its training data), read at the last token. The whole text is scored, as in TRL; only rows
    longer than max_length (default max_position_embeddings) lose their start, with a warning, so the completion's end
    is always scored. A prompt's n consecutive rows are scored in one packed row, common tokens once (packing.py)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        if model.cfg.num_labels != 1:
            raise ValueError(f"a reward model needs num_labels=1; this one has {model.cfg.num_labels}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or (model.cfg.hf_config or {}).get("max_position_embeddings")
        self.batch_size, self.warned = batch_size, False

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **unused) -> torch.Tensor:  # [N] on the CPU
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = prompts[start:start + self.batch_size], completions[start:start + self.batch_size]
            ids, mask = self.tokenizer.encode_rows(*texts)
            if self.max_length and ids.shape[1] > self.max_length:
                if not self.warned:
                    print(f"warning: the reward model reads at most {self.max_length} tokens; longer prompts + "
                          "completions lose their start", file=sys.stderr)
                self.warned = True
                ids, mask = self.tokenizer.encode_rows(*texts, max_length=self.max_length)
            runs = {len(list(run)) for _, run in itertools.groupby(texts[0])}  # a prompt's rows, one after another
            rows = [r[m.bool()] for r, m in zip(ids, mask)]
            packed, last = pack_shared_prefixes(rows, runs.pop() if len(runs) == 1 else 1)
            out = self.model(packed.input_ids.to(device), positions=packed.positions.to(device),
                             block_mask=packed.block_mask.to(device))  # [groups, columns, 1]
            scores.append(out[torch.arange(len(last), device=device)[:, None], last.to(device), 0].flatten().float())
        return torch.cat(scores).cpu()


class RewardModelJudge(ScoreJudge):
    def __init__(self, reward_model: RewardModel):
        self.reward_model = reward_model

    def scores(self, prompts, completions):
        return self.reward_model(prompts, completions).tolist()


class RewardFunctions:
    """Reward functions, callables (prompts, completions, **kwargs) -> list[float] such as a RewardModel, summed
    with weights into one score per completion, as TRL's `reward_funcs`; a value of None (no opinion) adds nothing."""

    def __init__(self, funcs: list, weights: list[float] | None = None):
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
        self.funcs, self.weights = list(funcs), list(weights or [1.0] * len(funcs))

    def __call__(self, prompts: list, completions: list[str], **kwargs) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for func, weight in zip(self.funcs, self.weights):
            values = func(prompts=prompts, completions=completions, **kwargs)
            name = getattr(func, "__name__", func)
            if not isinstance(values, (list, tuple, torch.Tensor)) or any(
                    not (v is None or isinstance(v, (int, float, torch.Tensor)) and math.isfinite(v)) for v in values):
                raise ValueError(f"reward function {name} returned {str(values)[:60]}, not a list of numbers (or None)")
            if len(values) != len(completions):
                raise ValueError(f"reward function {name} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            total += weight * torch.tensor([0.0 if v is None else float(v) for v in values])
        return total


def load_reward_function(spec: str):
    """The callable named by "module:attr" or "path/to/file.py:attr" (for a command-line flag)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {spec!r} should look like 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"reward function {spec!r}: no file {module_name}")
        loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable named {attr!r}")
    return func


# Model judges: the paper's LLM annotator, local or behind an API.


class LLMJudge(Pretrained, PairwiseJudge):
    """A local instruct model judging pairs from the log-probs of two labels as the answer's first token, in one
    forward pass over the comparison (chat template, generation prompt): no sampling, so a verdict is
    deterministic for a given order. `instruction` sets what "better" means (controllable feedback).

    Small judges prefer the first response shown far more than anything they read in it (about 2.3 nats for
    SmolLM2-135M). With both_orders (the default) each pair is shown both ways, two rows, and preferences()
    cancels that bias exactly; shuffle_order is then moot. Without it each pair is shown once, shuffled if
    asked, and its preference is its label gap. A pair is undecided (-1) within `margin`: 0.01 nats is far above
    batching's rounding (~1e-5) and below what an instruction moves (~0.1)."""

    def __init__(self, model, tokenizer, instruction: str = DEFAULT_INSTRUCTION, labels=("A", "B"),
                 margin: float = 0.01, batch_size: int = 8, seed: int = 0, both_orders: bool = True):
        self.label_ids = []
        for label in labels:
            ids = tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"LLMJudge label {label!r} is {len(ids)} tokens in this tokenizer; "
                                 "it must be exactly one (try 'A'/'B' or '0'/'1')")
            self.label_ids.append(ids[0])
        self.model, self.tokenizer = model.eval(), tokenizer
        self.instruction, self.labels, self.margin, self.batch_size = instruction, labels, margin, batch_size
        self.rng, self.both_orders = random.Random(seed), both_orders

    @torch.inference_mode()
    def label_logprobs(self, prompts, completion_pairs) -> torch.Tensor:
        """[N, 2]: log-probs of the two labels as the answer's first token, pairs in the order given."""
        conversations = [[{"role": "user", "content": comparison(p, a, b, self.instruction, self.labels)}]
                         for p, (a, b) in zip(prompts, completion_pairs)]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(conversations), self.batch_size):
            # Left padding puts every row's last token in the last column, the one logits_to_keep=1 keeps.
            ids, mask = self.tokenizer.encode_rows(conversations[start:start + self.batch_size], padding_side="left")
            logits = self.model(ids.to(device), mask.to(device), logits_to_keep=1)[:, -1].float()
            out.append(logits.log_softmax(-1)[:, self.label_ids])
        return torch.cat(out).cpu()

    def preferences(self, prompts, completion_pairs) -> torch.Tensor:
        """[N]: how much the judge prefers completion 0 to 1, in nats: the label gap logp(first label) -
        logp(second label) with completion 0 shown first, minus that with completion 1 first. A preference for a
        position or a label is in both gaps and cancels; the rest comes from the content. Swapping negates it."""
        # Both orders of a pair in adjacent rows: the same batch, about the same length.
        shown = [order for a, b in completion_pairs for order in ((a, b), (b, a))]
        logprobs = self.label_logprobs([p for p in prompts for _ in range(2)], shown)
        gap = (logprobs[:, 0] - logprobs[:, 1]).view(-1, 2)
        return gap[:, 0] - gap[:, 1]

    def judge(self, prompts, completion_pairs, shuffle_order=True):
        completion_pairs, swapped = shuffle_pairs(completion_pairs, self.rng, shuffle_order and not self.both_orders)
        if self.both_orders:
            preference = self.preferences(prompts, completion_pairs)
        else:
            logprobs = self.label_logprobs(prompts, completion_pairs)
            preference = logprobs[:, 0] - logprobs[:, 1]
        return unshuffle([-1 if abs(s) <= self.margin else int(s < 0) for s in preference.tolist()], swapped)


class OpenAIJudge(PairwiseJudge):
    """An OpenAI-compatible chat-completions endpoint as the judge, over plain http.client: one request per pair,
    `max_workers` at a time, answered "0" or "1" (any other reply is -1). A request is retried with exponential
    backoff and jitter on HTTP 429/5xx, timeouts and connection errors; a pair that still fails is -1 and counted
    in `self.failures` (lifetime). If all pairs of a call fail, judge() raises JudgeError (endpoint, last error).

    Each try has `timeout` seconds in all (connecting, sending, every byte of the reply), so a pair gives up
    after at most (max_retries + 1) * timeout + backoff * (2**(max_retries + 1) - 2) seconds: 40 + 28 with the
    defaults. Redirects are never followed: the API key goes to the configured host and no other. No proxy."""

    def __init__(self, model: str = "gpt-4o-mini", base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 instruction: str = DEFAULT_INSTRUCTION, timeout: float = 10.0, max_retries: int = 3,
                 backoff: float = 1.0, max_workers: int = 8, seed: int = 0):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.instruction = model, api_key_env, instruction
        self.timeout, self.max_retries, self.backoff, self.max_workers = timeout, max_retries, backoff, max_workers
        self.rng, self.failures = random.Random(seed), 0

    def request(self, content: str) -> str:
        """The model's reply to one user message; raises the last error once retries are spent."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": 1, "temperature": 0}  # the answer is one token: "0" or "1"
        # Read at each request, not at init: a key exported later, or none for a local server.
        key = os.environ.get(self.api_key_env)
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        for attempt in range(self.max_retries + 1):
            try:
                status, reason, body = self.post(json.dumps(payload).encode(), headers)
                if status == 200:
                    break
                # Other 4xx (bad key, bad request, unknown model) will not get better by asking again.
                if status != 429 and status < 500 or attempt == self.max_retries:
                    hint = f" (is ${self.api_key_env} set?)" if status == 401 and not key else ""
                    hint += " (redirects are not followed: the key goes to no other host)" if 300 <= status < 400 else ""
                    raise RuntimeError(f"HTTP {status} {reason}{hint}")
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused or dropped connections
                if attempt == self.max_retries:
                    raise RuntimeError(f"{type(e).__name__}: {e}") from None
            time.sleep(self.backoff * 2 ** attempt * (1 + random.random()))
        try:
            content = json.loads(body)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):  # e.g. a list of content parts: not an answer of "0" or "1"
            raise RuntimeError(f"not a chat-completions reply with text content: {body[:100]!r}")
        return content

    def post(self, body: bytes, headers: dict) -> tuple[int, str, bytes]:
        """One POST to self.url: (status, reason, reply body) within self.timeout s. The socket's timeout bounds
        each read only (a byte every few seconds would hold it forever): a watchdog shuts it at the deadline."""
        url = urllib.parse.urlsplit(self.url)
        connection = (http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection)(
            url.netloc, timeout=self.timeout)

        sockets = []  # the connection's, kept: http.client lets go of it once the reply has begun

        def shut():
            for sock in sockets:
                with contextlib.suppress(OSError):  # closed already
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read: it ends at once

        watchdog, start = threading.Timer(self.timeout, shut), time.monotonic()
        watchdog.start()
        try:
            connection.connect()  # itself bounded by the socket's timeout
            sockets.append(connection.sock)
            connection.request("POST", url.path, body, headers)
            response = connection.getresponse()
            return response.status, response.reason, response.read()
        except (OSError, http.client.HTTPException):
            if time.monotonic() - start >= self.timeout:  # the watchdog's doing: not "connection reset"
                raise TimeoutError(f"no complete reply within {self.timeout} s") from None
            raise
        finally:
            watchdog.cancel()
            connection.close()

    def judge(self, prompts, completion_pairs, shuffle_order=True):
        completion_pairs, swapped = shuffle_pairs(completion_pairs, self.rng, shuffle_order)
        contents = [comparison(p, a, b, self.instruction, ("0", "1")) for p, (a, b) in zip(prompts, completion_pairs)]

        def ask(content):
            try:
                return self.request(content), None
            except RuntimeError as e:
                return None, e

        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            results = list(pool.map(ask, contents))
        errors = [e for _, e in results if e is not None]
        self.failures += len(errors)
        if errors and len(errors) == len(results):
            raise JudgeError(f"judge endpoint {self.url} failed on all {len(results)} pairs; last error: {errors[-1]}")
        verdicts = [{"0": 0, "1": 1}.get(reply.strip(), -1) if reply is not None else -1 for reply, _ in results]
        return unshuffle(verdicts, swapped)


# train.py --judge NAME

def pair_rm_judge(**options) -> PairwiseJudge:
    """llm-blender's PairRM (see pair_rm.py), imported here on use: pair_rm.py imports this module."""
    from .pair_rm import PairRMJudge

    return PairRMJudge.from_pretrained(**options)


JUDGES = {"shorter": ShorterJudge, "keyword": KeywordJudge, "llm": LLMJudge.from_pretrained, "openai": OpenAIJudge,
          "pair_rm": pair_rm_judge}


def make_judge(name: str, **options) -> PairwiseJudge:
    """The judge registered under `name`, built with `options` (e.g. make_judge("openai", model=...))."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available judges: {', '.join(JUDGES)}")
    return JUDGES[name](**options)


class Preference:
    """Which of each prompt's n sampled completions are chosen and rejected (the rollout's last part).
    A pairwise judge compares a prompt's two completions; -1 (undecided) drops the pair. A reward model and/or
    reward functions (weighted by reward_weights, the model's first) score each completion, those without EOS
    lose missing_eos_penalty, and the best-scored is chosen, the worst rejected (see __call__ for ties)."""

    def __init__(self, cfg, device):
        self.scorers, self.penalty = [], cfg.missing_eos_penalty
        dtype = torch.bfloat16 if cfg.bf16 else None  # fp32 unless --bf16: near-tie verdicts can flip in half precision
        options = {"llm": {"path": cfg.judge_model or cfg.model_name_or_path, "device": device,
                           "instruction": cfg.judge_instruction or DEFAULT_INSTRUCTION},
                   "pair_rm": {"device": device, "dtype": dtype} | ({"path": cfg.judge_model} if cfg.judge_model else {})}
        self.judge = make_judge(cfg.judge, **options.get(cfg.judge, {})) if cfg.judge else None
        if cfg.reward_model_path:
            self.scorers.append(RewardModel.from_pretrained(cfg.reward_model_path, dtype=dtype, device=device))
        self.scorers += [load_reward_function(f) for f in cfg.reward_funcs or []]
        self.rewards = RewardFunctions(self.scorers, cfg.reward_weights)

    def __call__(self, rows: list[dict], completions: list[str], has_eos: torch.Tensor, n: int = 2, **kwargs):
        """(chosen [B], rejected [B], decided [B] bool, scores [B*n] or None) for B dataset rows ({"prompt", ...})
        with completions b*n .. b*n+n-1 of `completions` and has_eos [B*n]; chosen and rejected index a prompt's n
        completions. Reward functions get what TRL passes, one entry per completion: conversational completions as
        an assistant message, the rows' other columns, `kwargs` (completion_ids, trainer_state)."""
        prompts, B = [row["prompt"] for row in rows], len(rows)
        if self.judge is not None:
            pairs = [(completions[n * b], completions[n * b + 1]) for b in range(B)]
            verdicts = torch.tensor(self.judge.judge([prompt_text(p) for p in prompts], pairs))
            second = (verdicts == 1).long()
            return second, 1 - second, verdicts != -1, None
        prompts = [p for p in prompts for _ in range(n)]
        completions = [c if isinstance(p, str) else [{"role": "assistant", "content": c}]
                       for p, c in zip(prompts, completions)]
        names = dict.fromkeys(name for row in rows for name in row if name != "prompt")
        columns = {name: [row.get(name) for row in rows for _ in range(n)] for name in names}
        scores = self.rewards(prompts, completions, **columns, **kwargs)
        if self.penalty:
            scores = scores - self.penalty * (~has_eos.cpu()).float()
        groups = scores.view(B, n)
        chosen = groups.argmax(1)  # the first of equal best scores
        rejected = groups.scatter(1, chosen[:, None], math.inf).argmin(1)  # the worst of the others
        # Of two equal scores the first wins, as in the reference; more than two all equal say nothing.
        decided = groups.amax(1) > groups.amin(1) if n > 2 else torch.ones(B, dtype=torch.bool)
        return chosen, rejected, decided, scores
