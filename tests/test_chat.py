"""The chat CLI on the offline SmolLM2: it answers through a pipe, streams what it returns, keeps
the conversation as history and forgets it on /clear."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

import minidpo
from minidpo.chat import Chat

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_chat_through_a_pipe(offline_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "minidpo.chat", "--model_name_or_path", str(offline_model_dir),
         "--temperature", "0", "--max_new_tokens", "24", "--device", "cpu"],
        input="What is the capital of France?\n/clear\nHi\n/exit\n", capture_output=True, text=True,
        cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "(history cleared)" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 2  # one reply per message


def test_history_streaming_and_clear(offline_model_dir):
    model, tokenizer = minidpo.load_pretrained(str(offline_model_dir))
    chat = Chat(model.eval(), tokenizer, system="Answer briefly.", temperature=0, max_new_tokens=12)
    out = io.StringIO()
    first = chat.reply("What is the capital of France?", out)
    assert out.getvalue() == first + "\n"  # what was streamed is the reply, no more, no less
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    assert chat.history[-1]["content"] == first

    chat.reply("And of Italy?", io.StringIO())
    assert len(chat.history) == 5  # the second question was asked after the first exchange

    chat.clear()
    assert chat.history == [{"role": "system", "content": "Answer briefly."}]
    # After /clear the same question gets the same greedy answer as in a fresh conversation.
    assert chat.reply("What is the capital of France?", io.StringIO()) == first
