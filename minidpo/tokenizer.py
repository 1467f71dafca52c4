"""A small tokenizer: `tokenizers.Tokenizer` plus special tokens and the chat template. From a Hugging Face model
directory's files it gives the same ids and rendered chat as `transformers.AutoTokenizer`, without transformers.

BOS/EOS: given a tokenizer.json, transformers 5 ignores `add_bos_token` / `add_eos_token` in tokenizer_config.json and
keeps the stored post-processor (Llama included): `encode` is the plain `tokenizers` encode; those keys go unread."""

import functools
import itertools
import json
import re
import sys
from datetime import datetime
from pathlib import Path

import jinja2.ext
import torch
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from .common import COUNT, NUMBER, TOKEN_IDS, check_keys, error_line, read_json, write_json

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# What the keys read from tokenizer_config.json, special_tokens_map.json, generation_config.json must be.
TOKEN = ("a string or an added-token object",
         lambda v: isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str))
TEMPLATES = ("a string or a list of {name, template} objects", lambda v: isinstance(v, str) or isinstance(v, list)
             and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                     for t in v))
TOKENIZER_KEYS = {**dict.fromkeys(SPECIAL_TOKENS, TOKEN), "chat_template": TEMPLATES}
GENERATION_KEYS = {"eos_token_id": TOKEN_IDS, "bos_token_id": COUNT, "pad_token_id": COUNT, "top_k": COUNT,
                   "temperature": NUMBER, "top_p": NUMBER}
# Bounds on one render of a chat template, which is downloaded code: far above what real templates
# use (a few hundred lines of template code per message, outputs of a few thousand characters).
MAX_TEMPLATE_STEPS = 500_000  # lines of template code run: a second or two
MAX_TEMPLATE_SIZE = 2**20  # characters (or items) of any value built, the output included


def _read_json(path: Path, rules: dict) -> dict:
    """An optional file's JSON object, its keys checked against rules: {} when the file is absent."""
    return check_keys(read_json(path), rules, path) if path.is_file() else {}


def read_generation_config(model_dir) -> dict:
    return _read_json(Path(model_dir) / "generation_config.json", GENERATION_KEYS)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it (for
    its assistant-token masks); the text renders as it is, in a scope of its own as there."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class TemplateLimit(Exception):
    """A chat template went past a bound of the sandbox."""


def _check_size(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_TEMPLATE_SIZE:
        raise TemplateLimit(f"it built a value of {len(value)} items (at most {MAX_TEMPLATE_SIZE})")
    return value


def _check_format(fmt, args=()):
    # A field width is a size too: '%0999999999d' % 1, '%*d' % (999999999, 1), '{:>999999999}'.format(1): 1 GB.
    if isinstance(fmt, str) and (re.search(r"\d{7,}", fmt) or any(type(a) is int and a > 999_999 for a in args)):
        raise TemplateLimit(f"a format string with a field width of a million or more: {fmt[:40]!r}")
    return fmt


def _bounded(func):
    """func for template code: an integer argument beyond the size bound (a width, count or exponent
    that would allocate that much) is refused before the call, a result beyond it after."""
    @functools.wraps(func)  # keeps Jinja's pass_context marks of filters
    def call(*args, **kwargs):
        if any(type(a) is int and abs(a) > MAX_TEMPLATE_SIZE for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"an integer argument beyond {MAX_TEMPLATE_SIZE}")
        return _check_size(func(*args, **kwargs))
    return call


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b` builds a string outside every call: check it
        self.write("environment.check_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox (no attribute of Python's internals, nothing mutated) with bounded sizes: every
    call, filter, operator, `~` and output buffer goes through _bounded or _check_size, so no value
    outgrows MAX_TEMPLATE_SIZE by more than one step. Time is bounded by _render's step count."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])
    check_size = staticmethod(_check_size)

    def call_binop(self, context, operator, left, right):
        # A repetition ('ab' * n, [x] * n) has a size known before it is built: check it first.
        seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
        if operator == "*" and isinstance(seq, (str, list, tuple)) and type(n) is int \
                and len(seq) * n > MAX_TEMPLATE_SIZE:
            raise TemplateLimit(f"it repeats a value to {len(seq) * n} items (at most {MAX_TEMPLATE_SIZE})")
        if operator == "%":
            _check_format(left, right if isinstance(right, tuple) else ())
        return _bounded(super().call_binop)(context, operator, left, right)

    def wrap_str_format(self, value):  # the attribute lookup of str.format and str.format_map
        if getattr(value, "__name__", None) in ("format", "format_map"):
            _check_format(value.__self__)
        return super().wrap_str_format(value)

    def call(self, context, obj, /, *args, **kwargs):
        return _bounded(super().call)(context, obj, *args, **kwargs)

    def concat(self, parts) -> str:  # output buffers: the render's output, macros', {% set %} blocks'
        out, total = [], 0
        for part in parts:
            total += len(part)
            if total > MAX_TEMPLATE_SIZE:
                raise TemplateLimit(f"its output grew beyond {MAX_TEMPLATE_SIZE} characters")
            out.append(part)
        return "".join(out)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The same environment settings as transformers; with other whitespace rules the prompts would differ.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    format_filter = env.filters["format"]
    env.filters["format"] = lambda fmt, *args, **kwargs: format_filter(_check_format(fmt, args), *args, **kwargs)
    env.filters = {name: _bounded(f) for name, f in env.filters.items()}
    env.globals |= {"raise_exception": _raise_exception, "strftime_now": lambda fmt: datetime.now().strftime(fmt)}
    return env.from_string(template)


def _render(template: jinja2.Template, **variables) -> str:
    """template.render within MAX_TEMPLATE_STEPS lines of template code: the one time bound covering every loop
    and recursion. Jinja compiles templates to Python in frames named <template>; only those are traced."""
    steps = itertools.count(1)

    def count(frame, event, arg):
        if next(steps) > MAX_TEMPLATE_STEPS:
            raise TemplateLimit(f"it ran more than {MAX_TEMPLATE_STEPS} steps")
        return count

    previous = sys.gettrace()  # a debugger's or coverage's: back after the render
    sys.settrace(lambda frame, event, arg: count if frame.f_code.co_filename == "<template>" else None)
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)


class Tokenizer:
    def __init__(self, backend: _Backend, special: dict[str, str | None], chat_template: str | None = None,
                 extra_eos_ids: list[int] = (), template_origin: str = "chat_template"):
        # A tokenizer.json may be saved with padding or truncation on; transformers turns both off unless asked.
        backend.no_padding()
        backend.no_truncation()
        self._tok = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (special.get(k) for k in SPECIAL_TOKENS)
        self.chat_template, self.template_origin = chat_template, template_origin  # origin: the file, for errors
        self.known_roles = set()  # roles the template was seen to render (apply_chat_template)
        self.bos_token_id, self.eos_token_id, pad_id = (None if token is None else backend.token_to_id(token)
                                                        for token in (self.bos_token, self.eos_token, self.pad_token))
        # Many chat models ship no pad token: eos pads instead (padding is masked out anyway).
        self.pad_token_id = self.eos_token_id if pad_id is None else pad_id
        # Turns may end with a non-eos token (<|eot_id|>) named only in generation_config.json: stop on any.
        self.eos_token_ids = list(dict.fromkeys(i for i in (self.eos_token_id, *extra_eos_ids) if i is not None))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"could not parse {tok_file}: {e}") from e
        config = _read_json(path / "tokenizer_config.json", TOKENIZER_KEYS)
        special_map = _read_json(path / "special_tokens_map.json", TOKENIZER_KEYS)
        special = {k: config.get(k) or special_map.get(k) for k in SPECIAL_TOKENS}
        # A special token is stored either as a string or as a serialized AddedToken dict.
        special = {k: v["content"] if isinstance(v, dict) else v for k, v in special.items()}
        template_file = path / "chat_template.jinja"
        if template_file.is_file():  # transformers 5 saves the template here, and it wins over the config's
            try:
                template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{template_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        else:
            template, template_file = config.get("chat_template"), path / "tokenizer_config.json"
        if isinstance(template, list):  # several named templates: transformers uses the one named "default"
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        eos = read_generation_config(path).get("eos_token_id")  # an id, a list of ids, or None (dropped in __init__)
        return cls(backend, special, template, eos if isinstance(eos, list) else [eos], str(template_file))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: list[str], padding_side: str = "left", add_special_tokens: bool | list[bool] = True,
                 max_length: int | None = None, truncation_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both [len(texts), longest row], padded on padding_side. add_special_tokens may be
        given per text: a batch can mix plain prompts with chat-templated ones, which hold theirs already."""
        adds = [add_special_tokens] * len(texts) if isinstance(add_special_tokens, bool) else add_special_tokens
        rows = [self.encode(text, add) for text, add in zip(texts, adds, strict=True)]
        if max_length is not None:
            rows = [r[-max_length:] if truncation_side == "left" else r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        if self.pad_token_id is None and any(len(r) < width for r in rows):
            raise ValueError("cannot pad: the tokenizer has neither a pad token nor an eos token")
        ids = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)  # 0: never used, no padding
        mask = torch.zeros_like(ids)
        for row, r in enumerate(rows):
            cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[row, cols] = torch.tensor(r, dtype=torch.long)
            mask[row, cols] = 1
        return ids, mask

    def render(self, prompt, completion=None) -> str:
        """The text a model reads for a prompt, or a prompt and its completion (a reward model's input).

        A plain prompt is its text, the completion appended. A conversation (a list of {"role", "content"} messages)
        goes through the chat template: a completion becomes the assistant's turn (a list of messages is appended as
        it is); without one the text ends with the generation prompt. A conversation ending with an assistant turn is
        continued instead (continue_final_message, as TRL does), a completion appended to that turn's text."""
        if isinstance(prompt, str):
            return prompt + (completion or "")
        continued = prompt[-1]["role"] == "assistant"
        if completion is None:
            return self.apply_chat_template(prompt, add_generation_prompt=not continued,
                                            continue_final_message=continued)
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if continued:  # the completion's first message is the rest of the prompt's final one
            last = prompt[-1] | {"content": prompt[-1]["content"] + completion[0]["content"]}
            prompt, completion = prompt[:-1], [last, *completion[1:]]
        return self.apply_chat_template(prompt + completion)

    def encode_rows(self, prompts: list, completions: list | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of render(prompt, completion) for each row; kwargs as for __call__. The one place of
        the rule for special tokens: a plain prompt gets the tokenizer's own (its post-processor adds BOS
        where the model wants one), a conversation does not (its template wrote them: a second BOS otherwise)."""
        completions = completions if completions is not None else [None] * len(prompts)
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self(texts, add_special_tokens=[isinstance(p, str) for p in prompts], **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            continue_final_message: bool = False, **kwargs):
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template.jinja and none in "
                             "tokenizer_config.json)")
        # As transformers, drop None values (OpenAI's content=None): templates test for a key, else print "None".
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        # A message's reasoning goes under every name templates read it by (Qwen3: reasoning_content), as in
        # transformers: the first of these present fills "reasoning_content" and, if absent, "thinking".
        for i, m in enumerate(messages):
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            if reasoning is not None:
                messages[i] = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        # As transformers continues the final message: mark where its text ends, render, cut there.
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            messages[-1] = messages[-1] | {"content": messages[-1]["content"] + tag}
        # Absent special tokens stay undefined (render as ""), not None (renders "None"); tools and documents
        # are passed as None because templates test `tools is not none`.
        variables = {k: getattr(self, k) for k in SPECIAL_TOKENS if getattr(self, k) is not None}
        variables.update({"tools": None, "documents": None, "add_generation_prompt": add_generation_prompt, **kwargs})
        text = self._render(messages, variables)
        # A template may silently drop the messages of a role it does not know (transformers renders them all
        # the same), so each new role is probed once with its contents replaced by a marker that must show (not
        # the contents: templates may trim or rewrite those; digits, which no case change, trim or title touches).
        for role in {m.get("role") for m in messages} - self.known_roles:
            marker = "5093172864"
            probe = [{**m, "content": marker} if m.get("role") == role else m for m in messages]
            if marker not in self._render(probe, variables):
                raise ValueError(f"{self.template_origin}: the chat template drops messages with role {role!r}")
            self.known_roles.add(role)
        if continue_final_message:
            if tag.strip() not in text:
                raise ValueError("the chat template drops the final message's text, so it cannot be continued")
            end = text.rindex(tag.strip())  # a template that strips the message's end loses the tag's space too
            text = text[:end] if text[end:end + len(tag)] == tag else text[:end].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text  # no second BOS: encode_rows

    def _render(self, messages: list[dict], variables: dict) -> str:
        try:
            return _render(_compile(self.chat_template), messages=messages, **variables)
        except jinja2.exceptions.TemplateError as e:  # e.g. raise_exception("System role not supported")
            first_line = (e.message or type(e).__name__).strip().splitlines()[0]
            raise ValueError(f"the chat template rejected a conversation: {first_line}") from e
        except Exception as e:  # a bound of the sandbox, a recursion too deep, a type error in the template
            raise ValueError(f"{self.template_origin}: the chat template failed "
                             f"({type(e).__name__}: {error_line(e)})") from None

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = {k: getattr(self, k) for k in SPECIAL_TOKENS if getattr(self, k) is not None}
        # Without a class name AutoTokenizer may guess one from a config.json next to it (e.g. Qwen2Tokenizer),
        # and those classes rebuild the pre-tokenizer instead of loading tokenizer.json as it is.
        write_json(path / "tokenizer_config.json", config | {"tokenizer_class": "PreTrainedTokenizerFast"})
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
