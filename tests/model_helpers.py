"""Tiny transformers models and inputs shared by the model tests (test_model, test_families, test_packing)."""

import torch
import transformers as T

import minidpo

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
TOL = 1e-4  # fp32, max abs diff


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that attention is far from uniform (so a wrong rotary position shows),
    non-zero biases and norm weights away from 1 (so a bias or norm that is not loaded shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(tmp_path, config, cls, seed=0):
    """(transformers reference, minidpo model) with the same weights, through save/load."""
    ref = randomize(cls(config), seed)
    ref.save_pretrained(tmp_path)
    return ref, minidpo.load_model(str(tmp_path)).eval()


def random_ids(batch, length, seed=1):
    # Never 0: the sequence-classification tests use 0 as pad_token_id.
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_positions(mask):
    # A token's position is the number of real tokens before it, as minidpo computes it.
    return (mask.cumsum(-1) - 1).clamp(min=0)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CAUSAL = {
    "llama_gqa_untied": lambda: (T.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False),
                                 T.LlamaForCausalLM),
    "llama_bias": lambda: (T.LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
                           T.LlamaForCausalLM),
    # head_dim 16: with original context 16 the 8 frequencies fall in all three Llama 3 bands
    # (kept, interpolated, divided by factor); the 48-token inputs run past that context.
    "llama3_rope": lambda: (T.LlamaConfig(**COMMON, num_key_value_heads=1, rope_theta=500.0,
                                          rope_scaling=dict(LLAMA3_ROPE)), T.LlamaForCausalLM),
    "llama_linear_rope": lambda: (T.LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                                  T.LlamaForCausalLM),
    "qwen2_tied": lambda: (T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
                           T.Qwen2ForCausalLM),
    "neox_parallel": lambda: (T.GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=True),
                              T.GPTNeoXForCausalLM),
    "neox_sequential": lambda: (T.GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=False),
                                T.GPTNeoXForCausalLM),
}
