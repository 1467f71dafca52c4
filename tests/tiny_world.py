"""A tiny world shared by the trainer, distributed and judge tests: ~70 words, ChatML specials, and a
pad token distinct from EOS (transformers' sequence classifiers find each row's last token
through pad_token_id, so EOS must not be the pad); tiny models and datasets built on it
(make_world, the `world` fixture of conftest.py) and the command line that trains on them."""

import json
from pathlib import Path

import torch
import transformers as T

import train
from minidpo.trainer import Trainer

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant the a cat dog sat on mat red blue green big small one two three four five "
         "six seven eight nine ten good bad yes no hello world what is why how who you we they it and or "
         "but not very short long answer question tell me about say write word day night sun moon tree "
         "water fire stone bird fish run jump eat").split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, EOS = VOCAB["<pad>"], VOCAB["<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MODEL = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD,
             bos_token_id=None, tie_word_embeddings=False)


def save_tokenizer(path: Path):
    backend = Backend(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<pad>",
              "unk_token": "<unk>", "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_model(path: Path, model) -> Path:
    """A transformers model saved with the tiny tokenizer beside it."""
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def tiny_llama(root: Path) -> Path:
    """The tiny Llama (seed 0) saved in root/llama, the model most tests train."""
    torch.manual_seed(0)
    return save_model(root / "llama", T.LlamaForCausalLM(T.LlamaConfig(**MODEL, num_key_value_heads=2)))


def crash_before_step(monkeypatch, step: int):
    """Make Trainer.train_step raise before optimizer step `step` (from 1), as a killed run would stop."""
    train_step = Trainer.train_step

    def crashing(self, batches):
        if self.step == step - 1:
            raise RuntimeError("simulated crash")
        return train_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crashing)


def words(i: int, n: int) -> str:
    return " ".join(WORDS[3 + (i * 7 + j * 3) % (len(WORDS) - 3)] for j in range(n))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_world(root: Path) -> dict:
    """Paths of the tiny models and datasets the trainer tests share (read-only)."""
    paths = {
        "llama": tiny_llama(root),
        "neox": save_model(root / "neox", T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**MODEL, rotary_pct=0.25))),
        "neox_rm": save_model(root / "neox_rm", T.GPTNeoXForSequenceClassification(
            T.GPTNeoXConfig(**MODEL, rotary_pct=0.25, num_labels=1))),
    }
    # Half the prompts conversational, half standard: the trainer takes both.
    rows = [{"prompt": [{"role": "user", "content": words(i, 2 + i % 4)}]} if i % 2 else
            {"prompt": words(i, 3 + i % 3)} for i in range(32)]
    paths["prompts"] = write_jsonl(root / "prompts.jsonl", rows)
    # TL;DR-like standard rows with the extra completion column trl-lib/tldr has.
    paths["tldr"] = write_jsonl(root / "tldr.jsonl", [
        {"prompt": f"{words(i, 6)} tell me about it", "completion": words(i + 1, 3)} for i in range(16)])
    return paths


def run(argv) -> int:
    return train.main([str(a) for a in argv])


def base(world, out, *extra):
    return ["--model_name_or_path", world["llama"], "--dataset_name", world["prompts"], "--output_dir", out,
            "--max_new_tokens", 8, "--max_length", 64, "--logging_steps", 1, "--save_steps", 0, *extra]
