"""Talk to a model: `python -m minidpo.chat --model_name_or_path out/`.

Reads one message per line from stdin (a pipe works too), answers through the model's chat template with the whole
conversation so far, printing the reply as it comes. `/clear` forgets the conversation, `/exit` (or EOF) quits."""

import argparse
import sys

import torch

from .lora import load_pretrained_or_adapter
from .sampler import Sampler
from .common import error_line, print_error


class Chat:
    def __init__(self, model, tokenizer, system=None, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=256,
                 seed=None):
        self.model, self.tokenizer, self.system, self.max_new_tokens = model, tokenizer, system, max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.sampler = Sampler(model)  # keeps its KV cache (and CUDA graph) from one turn to the next
        self.generator = torch.Generator(model.embed.weight.device).manual_seed(seed) if seed is not None else None
        self.clear()

    def clear(self):
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, message: str, out=sys.stdout) -> str:
        """The answer to `message` after the conversation so far, streamed to `out`; both turns join the history."""
        conversation = self.history + [{"role": "user", "content": message}]
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        self.sampler.reserve(1, len(ids) + self.max_new_tokens)  # refuses what exceeds the model's positions
        self.history = conversation  # only once the template and the sampler have taken it
        new, shown, text = [], "", ""
        for token in self.sampler.stream(torch.tensor([ids]), self.max_new_tokens, **self.sampling,
                                         eos_token_ids=self.tokenizer.eos_token_ids, generator=self.generator):
            new.append(token)
            # Decode everything so far, not the token alone: a byte-level token may be half of a character
            # (decoded as U+FFFD until its other half comes), and a leading space may depend on the previous token.
            text = self.tokenizer.decode(new)
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", file=out, flush=True)
                shown = text
        out.write(text[len(shown):] + "\n")
        self.history.append({"role": "assistant", "content": text})
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a model (one message per line; /clear, /exit).")
    p.add_argument("--model_name_or_path", default="offline:SmolLM2-135M-Instruct",
                   help="a model, or a LoRA adapter directory (its base model with the adapter merged in)")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--system", help="a system message to start every conversation with")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def flag_error(args) -> str | None:
    bounds = (("temperature", args.temperature >= 0, ">= 0"), ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
              ("top_k", args.top_k >= 0, ">= 0"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"))
    for name, ok, allowed in bounds:
        if not ok:
            return f"--{name} must be {allowed}, got {getattr(args, name)}"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {args.device}: this machine has no CUDA device (use --device cpu)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if message := flag_error(args):
        print_error(message)
        return 2
    try:
        model, tokenizer = load_pretrained_or_adapter(args.model_name_or_path, device=args.device)
        if tokenizer.chat_template is None:
            raise ValueError(f"{args.model_name_or_path} has no chat template: chat needs an instruct model")
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print_error(error_line(e))
        return 1
    chat = Chat(model.eval(), tokenizer, args.system, args.temperature, args.top_p, args.top_k,
                args.max_new_tokens, args.seed)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the model as U+FFFD, not a traceback
        sys.stdin.reconfigure(errors="replace")
    print("Type a message; /clear starts over, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if line == "/exit":
            return 0
        if line == "/clear":
            chat.clear()
            print("(history cleared)", file=sys.stderr)
        elif line:
            try:
                chat.reply(line)
            except ValueError as e:  # the template or the sampler refused the conversation; it stays as it was
                print_error(error_line(e))


if __name__ == "__main__":
    sys.exit(main())
