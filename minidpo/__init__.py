"""minidpo: online DPO for language models in raw PyTorch."""

from .checkpoint import load_model, save_pretrained
from .model import KVCache, ModelConfig, Transformer, last_token_scores
from .tokenizer import Tokenizer


def load_pretrained(name_or_path: str, dtype=None, device=None):
    """(model, tokenizer) from a local HF directory, a Hub repo id, or the offline SmolLM2
    ("offline:SmolLM2-135M-Instruct"). dtype defaults to float32."""
    from .checkpoint import check_vocabulary, resolve

    path = resolve(name_or_path)
    model, tokenizer = load_model(str(path), dtype=dtype, device=device), Tokenizer.from_dir(path)
    check_vocabulary(tokenizer, model.cfg, path)
    return model, tokenizer


__all__ = ["KVCache", "ModelConfig", "Tokenizer", "Transformer", "last_token_scores", "load_model",
           "load_pretrained", "save_pretrained"]
