"""Random transformers models of three families and left-padded prompt batches, for the sampler
tests (CPU and CUDA)."""

import torch
import transformers as T

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, rotary_pct=0.25)),
}
PAD = 0


def reference(family, seed=0):
    """A transformers model with random weights larger than its own init, so that logits are far
    from uniform (no near-ties for greedy decoding to break differently) and attention depends on
    position."""
    torch.manual_seed(seed)
    ref = FAMILIES[family]()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 1.0 if "embed" in name else 0.02 if "norm" in name else 0.15
            p.add_(scale * torch.randn_like(p))
    return ref.eval()


def prompts(lengths, seed=1):
    """A left-padded batch [len(lengths), max(lengths)] of random prompts (ids never PAD)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask
