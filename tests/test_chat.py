"""The chat CLI on the offline SmolLM2: it answers through a pipe, streams what it returns, keeps
the conversation as history and forgets it on /clear, and bad flags or a refusing template get one line."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

import minidpo
from minidpo.chat import Chat, main

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


@pytest.mark.parametrize("flags, says", [
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
])
def test_bad_flags_are_one_line(capsys, flags, says):
    assert main(flags + ["--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {says}"


def test_a_template_that_refuses_the_conversation_is_one_line(offline_model_dir, tmp_path, capsys, monkeypatch):
    refusing = tmp_path / "model"
    refusing.mkdir()
    for f in Path(offline_model_dir).iterdir():
        if f.name != "chat_template.jinja":
            (refusing / f.name).symlink_to(f)
    (refusing / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["--model_name_or_path", str(refusing), "--system", "Be brief.", "--device", "cpu"]) == 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == ["error: the chat template rejected a conversation: System role not supported"]
