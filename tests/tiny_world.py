"""A tiny world shared by the trainer and distributed tests: ~70 words, ChatML specials, and a
pad token distinct from EOS (transformers' sequence classifiers find each row's last token
through pad_token_id, so EOS must not be the pad)."""

import json
from pathlib import Path

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
