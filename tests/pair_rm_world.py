"""A tiny PairRM built in the tests: a DeBERTa-v3-like Unigram tokenizer with PairRM's prefix
tokens, and transformers' DebertaV2Model with PairRM's head saved in either layout."""

import json
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
PREFIXES = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]
WORDS = ("the a cat dog sat on mat red blue big small one two three yes no hello world what is why how who you "
         "we it and or not very short long answer question tell me about sun moon tree water fire bird fish").split()


def save_tokenizer(path: Path, prefixes=PREFIXES):
    """A DeBERTa-v3-like Unigram tokenizer: Metaspace pieces, [CLS] $A [SEP] around a text, and
    PairRM's four prefix tokens added after the vocabulary (as llm-blender adds them)."""
    pieces = SPECIALS + ["▁" + w for w in WORDS] + ["▁"] + list("abcdefghijklmnopqrstuvwxyz?.,!'")
    vocab = [(p, 0.0 if i < len(SPECIALS) else -1.0 - (i % 7) / 10) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_tokens([AddedToken(t, normalized=True) for t in prefixes])
    tok.save(str(path / "tokenizer.json"))
    return tok


def deberta_config(**overrides) -> T.DebertaV2Config:
    """A tiny DeBERTa-v3-shaped config (no absolute positions, no token types, post-norm)."""
    settings = dict(vocab_size=len(SPECIALS) + len(WORDS) + 40, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, relative_attention=True, position_buckets=8,
                    max_relative_positions=24, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                    position_biased_input=False, type_vocab_size=0, max_position_embeddings=128, hidden_act="gelu",
                    layer_norm_eps=1e-7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return T.DebertaV2Config(**{**settings, **overrides})


def save_pair_rm(path: Path, layout: str = "hf", seed: int = 0, **overrides):
    """A tiny random PairRM directory in llm-blender's layout ("pairrm": the ranker's config.json,
    DeBERTa-v3's settings implied) or PairRM-hf's ("hf": a DebertaV2PairRM config.json).
    Returns (the transformers encoder, the head's state) it holds."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if layout == "pairrm":  # DeBERTa-v3's settings, heads 64 wide
        overrides = dict(hidden_size=64, num_attention_heads=1, position_buckets=256, max_relative_positions=512,
                         max_position_embeddings=512, **overrides)
    config = deberta_config(**overrides)
    encoder = T.DebertaV2Model(config).eval()
    with torch.no_grad():  # every weight off its initial value, so that a swapped name cannot pass
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    H = config.hidden_size
    head = {"head_layer.1.weight": torch.randn(H, 2 * H) / H ** 0.5, "head_layer.1.bias": 0.1 * torch.randn(H),
            "head_layer.4.weight": torch.randn(1, H) / H ** 0.5, "head_layer.4.bias": torch.randn(1)}
    tensors = {f"pretrained_model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file({**tensors, **head}, str(path / "model.safetensors"))
    if layout == "pairrm":
        meta = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                "source_maxlength": 1224, "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05}
    else:
        meta = {**config.to_dict(), "architectures": ["DebertaV2PairRM"], "n_tasks": 1, "drop_out": 0.05}
    (path / "config.json").write_text(json.dumps(meta))
    save_tokenizer(path)
    return encoder, head
