"""minidpo: online DPO for language models in raw PyTorch."""

from .checkpoint import load_model, load_pretrained, save_pretrained
from .model import KVCache, ModelConfig, Transformer, last_token_scores
from .tokenizer import Tokenizer

__all__ = ["KVCache", "ModelConfig", "Tokenizer", "Transformer", "last_token_scores", "load_model",
           "load_pretrained", "save_pretrained"]
