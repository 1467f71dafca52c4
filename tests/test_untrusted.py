"""Untrusted inputs through the commands a user runs (train.py, the chat CLI, bench/winrate.py): no
code from a file runs, no file outside the model is read, the judge's key goes to no other host,
nothing hangs, and every bad input ends with one line naming the file, key, row or flag."""

import errno
import http.server
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from minidpo import chat, checkpoint, outputs
from minidpo.judges import JudgeError, OpenAIJudge
from tiny_world import WORDS, tiny_llama, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import winrate  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    model = tiny_llama(root)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": " ".join(WORDS[i:i + 3])} for i in range(8)])
    return {"model": model, "prompts": prompts, "root": root}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def copy_model(world, tmp_path) -> Path:
    return Path(shutil.copytree(world["model"], tmp_path / "model"))


def argv(world, out, model=None, *extra):
    return [str(a) for a in ["--model_name_or_path", model or world["model"], "--dataset_name", world["prompts"],
                             "--output_dir", out, "--max_new_tokens", 4, "--max_length", 32, "--save_steps", 0,
                             "--per_device_train_batch_size", 4, "--max_steps", 1, "--judge", "shorter", *extra]]


def one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith(("warning", "Type a message"))]  # the chat CLI's greeting
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def train_fails(capsys, args) -> str:
    assert train.main(args) == 1
    return one_error(capsys)


# ---- security: nothing outside is read, nothing runs, no key leaves ----


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", 3])
def test_index_cannot_point_outside_the_model(world, tmp_path, capsys, monkeypatch, name):
    model = copy_model(world, tmp_path)
    shutil.copy(model / "model.safetensors", tmp_path / "outside.safetensors")
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    with open(model / "model-00001-of-00001.safetensors", "rb") as f:
        names = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names if n != "__metadata__"}
    weight_map["lm_head.weight"] = name
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    opened = []
    real_init = checkpoint.SafetensorsFile.__init__
    monkeypatch.setattr(checkpoint.SafetensorsFile, "__init__", lambda self, p: opened.append(p) or real_init(self, p))
    line = train_fails(capsys, argv(world, tmp_path / "out", model))
    assert f"model.safetensors.index.json: weight_map names {json.dumps(name)}, not a file in {model}" in line
    assert opened == []  # refused before any weight file was opened


class Planted:
    """A pickle that, when loaded, creates the marker directory."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.fixture(scope="module")
def checkpoint_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "out"
    assert train.main(argv(world, out, None, "--max_steps", 2, "--save_steps", 1)) == 0
    return out / "checkpoint-1"


def resume_fails(world, capsys, tmp_path, ckpt) -> str:
    return train_fails(capsys, argv(world, tmp_path / "out", None, "--max_steps", 2, "--resume_from_checkpoint", ckpt))


def test_planted_pickle_in_checkpoint_metadata_does_not_run(world, checkpoint_dir, tmp_path, capsys):
    ckpt = Path(shutil.copytree(checkpoint_dir, tmp_path / "planted"))
    marker = tmp_path / "pwned"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    line = resume_fails(world, capsys, tmp_path, ckpt)
    assert f"{ckpt} is unreadable (its .metadata names os.makedirs, which DCP metadata never holds)" in line
    assert not marker.exists()


def test_checkpoint_metadata_cannot_name_files_outside(world, checkpoint_dir, tmp_path, capsys):
    ckpt = Path(shutil.copytree(checkpoint_dir, tmp_path / "escaping"))
    with open(ckpt / "state" / ".metadata", "rb") as f:
        meta = outputs.MetadataUnpickler(f).load()
    for info in meta.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(meta))
    line = resume_fails(world, capsys, tmp_path, ckpt)
    assert "its .metadata names the data file '../../outside.distcp', outside the checkpoint" in line


def test_planted_pickle_in_checkpoint_values_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(Planted(marker), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        outputs.SafePlanner().load_bytes(None, buffer)
    assert not marker.exists()


def test_the_good_checkpoint_still_resumes(world, checkpoint_dir, tmp_path):
    assert train.main(argv(world, tmp_path / "out", None, "--max_steps", 2,
                           "--resume_from_checkpoint", checkpoint_dir)) == 0


class Server:
    """A local HTTP server answering POSTs with `respond(handler)`; it records the headers it saw."""

    def __init__(self, respond):
        self.seen = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                server.seen.append(dict(self.headers))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST  # urllib turned a redirected POST into a GET, the key still attached

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_judge_key_never_follows_a_redirect_to_another_host(world, tmp_path, capsys, monkeypatch):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    other = Server(answer)

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", other.url + "/v1/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    configured = Server(redirect)
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", configured.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
        args = argv(world, tmp_path / "out")
        line = train_fails(capsys, args[:-2] + ["--judge", "openai"])
        assert "HTTP 302" in line and "redirects are not followed" in line, line
        assert configured.seen and configured.seen[0]["Authorization"] == "Bearer sk-secret"
        assert other.seen == []  # the other host heard nothing, the key least of all
    finally:
        configured.close()
        other.close()


def test_a_judge_that_drips_bytes_meets_the_deadline():
    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(100):  # a byte every 0.2 s: no single read ever times out
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)

    server = Server(drip)
    try:
        judge = OpenAIJudge(base_url=server.url, timeout=1.0, max_retries=0)
        start = time.monotonic()
        with pytest.raises(JudgeError, match="TimeoutError: no complete reply within 1.0 s"):
            judge.judge(["q"], [("a", "b")])
        assert time.monotonic() - start < 10  # would be 20 s of dripping without the deadline
    finally:
        server.close()


# ---- sizes and shapes that do not match the files ----


def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **changes}))


def test_absurd_layer_count_is_refused_before_building(world, tmp_path, capsys):
    model = copy_model(world, tmp_path)
    edit_json(model / "config.json", num_hidden_layers=10_000_000)
    line = train_fails(capsys, argv(world, tmp_path / "out", model))
    assert f"{model}/config.json: num_hidden_layers is 10000000, but the safetensors files hold 2 layers" in line


@pytest.mark.parametrize("file, key, value, says", [
    ("config.json", "hidden_size", "32", "must be a positive integer"),
    ("config.json", "num_attention_heads", 0, "must be a positive integer"),
    ("config.json", "rms_norm_eps", "tiny", "must be a finite number"),
    ("generation_config.json", "eos_token_id", ["a", "b"], "must be a token id or a list of token ids"),
    ("tokenizer_config.json", "chat_template", 5, "must be a string or a list of {name, template} objects"),
    ("tokenizer_config.json", "eos_token", ["x"], "must be a string or an added-token object"),
])
def test_wrong_json_types_name_file_and_key(world, tmp_path, capsys, file, key, value, says):
    model = copy_model(world, tmp_path)
    edit_json(model / file, **{key: value})
    assert f"{model / file}: {key!r} {says}" in train_fails(capsys, argv(world, tmp_path / "out", model))


def safetensors_with(path: Path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("second, says", [
    ([8, 24], "tensors a and b overlap"),
    ([-16, 0], "tensor b's bytes [-16, 0) do not fit its shape"),
])
def test_overlapping_or_negative_safetensors_offsets(world, tmp_path, capsys, second, says):
    model = copy_model(world, tmp_path)
    safetensors_with(model / "model.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                   "b": {"dtype": "F32", "shape": [4], "data_offsets": second}},
                     bytes(32))
    line = train_fails(capsys, argv(world, tmp_path / "out", model))
    assert f"{model}/model.safetensors is not a readable safetensors file" in line and says in line, line


# ---- flags, reward functions, datasets, judges ----


@pytest.mark.parametrize("flag, value", [("--num_train_epochs", "inf"), ("--learning_rate", "inf"),
                                         ("--max_grad_norm", "nan"), ("--beta", "nan")])
def test_non_finite_numeric_flags(world, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        train.main(argv(world, tmp_path / "out") + [flag, value])
    assert info.value.code == 2
    assert one_error(capsys) == f"error: {flag} must be finite, got {value}"


@pytest.mark.parametrize("returns", ['"1.0"', "[1.0] * len(completions) + ['x']", "[float('nan')] * len(completions)"])
def test_reward_function_of_the_wrong_type(world, tmp_path, capsys, returns):
    module = tmp_path / "rewards.py"
    module.write_text(f"def bad(prompts, completions, **kwargs):\n    return {returns}\n")
    args = argv(world, tmp_path / "out")[:-2] + ["--reward_funcs", f"{module}:bad"]
    assert "reward function bad returned" in train_fails(capsys, args)


def test_a_role_the_template_drops_is_reported(world, tmp_path, capsys):
    model = copy_model(world, tmp_path)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    data = tmp_path / "critic.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "critic", "content": "be short"},
                                           {"role": "user", "content": "tell me"}]}) + "\n")
    args = argv(world, tmp_path / "out", model, "--per_device_train_batch_size", 1)
    args[args.index("--dataset_name") + 1] = str(data)
    line = train_fails(capsys, args)
    assert f"{model}/chat_template.jinja: the chat template drops messages with role 'critic'" in line


def test_a_judge_that_decides_nothing_stops_the_run(world, tmp_path, capsys):
    # The keyword is in no completion of the tiny vocabulary: every pair is undecided.
    args = argv(world, tmp_path / "out")[:-2] + ["--judge", "keyword"]
    line = train_fails(capsys, args)
    assert "step 1: the judge decided none of the step's pairs; stopping rather than training on nothing" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_wholly_undecided_batch_warns_once(world, tmp_path, capsys, monkeypatch):
    from minidpo.judges import ShorterJudge

    calls = []

    def judge(self, prompts, pairs, shuffle_order=True):
        calls.append(1)
        return [-1] * len(pairs) if len(calls) % 2 else [0] * len(pairs)  # every first micro-batch undecided

    monkeypatch.setattr(ShorterJudge, "judge", judge)
    assert train.main(argv(world, tmp_path / "out", None, "--gradient_accumulation_steps", 2,
                           "--per_device_train_batch_size", 2, "--max_steps", 2)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: step 1: the judge decided none of a batch's pairs"]


def test_deeply_nested_dataset_line(world, tmp_path, capsys):
    data = tmp_path / "nested.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    args = argv(world, tmp_path / "out")
    args[args.index("--dataset_name") + 1] = str(data)
    assert f"{data}, line 2: JSON nested too deeply" in train_fails(capsys, args)


def test_full_disk_during_a_checkpoint(world, tmp_path, capsys, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", no_space)
    out = tmp_path / "out"
    line = train_fails(capsys, argv(world, out, None, "--max_steps", 2, "--save_steps", 1))
    assert f"could not write checkpoint {out / 'checkpoint-1'}" in line and "No space left on device" in line, line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == []  # no half-written directory


@pytest.mark.parametrize("state, says", [
    ({"step": "1"}, "'step' must be a non-negative integer"),
    ({"world_size": 1.5}, "'world_size' must be a positive integer"),
    ({"scheduler": {"base_lrs": ["x"]}}, "scheduler has 'base_lrs' = [\"x\"], not a value of ours"),
    ({"scheduler": {"optimizer": 1}}, "scheduler has 'optimizer' = 1, not a value of ours"),
])
def test_trainer_state_of_the_wrong_types(world, checkpoint_dir, tmp_path, capsys, state, says):
    ckpt = Path(shutil.copytree(checkpoint_dir, tmp_path / "ckpt"))
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    if "scheduler" in state:
        state = {"scheduler": {**saved["scheduler"], **state["scheduler"]}}
    edit_json(ckpt / "trainer_state.json", **state)
    line = resume_fails(world, capsys, tmp_path, ckpt)
    assert f"{ckpt / 'trainer_state.json'}: {says}" in line, line


# ---- chat templates and the chat CLI ----


def chat_model(world, tmp_path, template: bytes | str) -> Path:
    model = copy_model(world, tmp_path)
    (model / "chat_template.jinja").write_bytes(template if isinstance(template, bytes) else template.encode())
    return model


@pytest.mark.parametrize("template, says", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "TemplateLimit: it ran more than 500000 steps"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
     "TemplateLimit: it ran more than 500000 steps"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 'x' * 10**12 }}", "TemplateLimit"),
    ("{{ 10 ** 10 ** 10 }}", "TemplateLimit: an integer argument beyond"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "TemplateLimit: it built a value of 2097152 items"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
     "TemplateLimit: it built a value of 2097152 items"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "TemplateLimit: its output grew beyond"),
    ("{{ 'x'|center(10**12) }}", "TemplateLimit"),
    ("{{ '{:>99999999999}'.format(1) }}", "TemplateLimit: a format string with a field width"),
    ("{{ '%099999999999d' % 1 }}", "TemplateLimit: a format string with a field width"),
    ("{{ range(10**12)|list }}", "TemplateLimit"),
])
def test_chat_template_bounds(world, tmp_path, capsys, monkeypatch, template, says):
    model = chat_model(world, tmp_path, template)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert chat.main(["--model_name_or_path", str(model), "--device", "cpu", "--max_new_tokens", "4"]) == 0
    line = one_error(capsys)
    assert line.startswith(f"error: {model}/chat_template.jinja: the chat template failed (") and says in line, line


def test_non_utf8_chat_template_names_the_file(world, tmp_path, capsys):
    model = chat_model(world, tmp_path, b"{{ '\xff\xfe' }}")
    assert chat.main(["--model_name_or_path", str(model), "--device", "cpu"]) == 1
    assert one_error(capsys).startswith(f"error: {model}/chat_template.jinja is not UTF-8 text")


def test_chat_refuses_what_exceeds_the_positions(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhello\n/exit\n"))
    assert chat.main(["--model_name_or_path", str(world["model"]), "--device", "cpu",
                      "--max_new_tokens", "100000"]) == 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and all(e.endswith("do not fit the model's 256 positions (max_position_embeddings)")
                                    for e in errors), errors


def test_chat_with_binary_stdin(world):
    result = subprocess.run(
        [sys.executable, "-m", "minidpo.chat", "--model_name_or_path", str(world["model"]), "--device", "cpu",
         "--max_new_tokens", "4", "--temperature", "0"],
        input=b"\xff\xfe\x00\x81 hello\n\xc3\n/exit\n", capture_output=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert len(result.stdout.decode().splitlines()) == 2  # both lines were answered


# ---- bench/winrate.py ----


@pytest.mark.parametrize("line, says", [
    ("{not json", "line 2: malformed JSON"),
    (json.dumps({"prompt": "a question"}), "line 2: no string 'completion' column"),
    (json.dumps({"completion": "an answer"}), "line 2: no 'prompt' column"),
])
def test_winrate_bad_reference_line(world, tmp_path, capsys, line, says):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n" + line + "\n")
    assert winrate.main(["--model_name_or_path", str(world["model"]), "--reference_file", str(refs),
                         "--device", "cpu", "--output", str(tmp_path / "out.jsonl")]) == 1
    assert one_error(capsys).startswith(f"error: {refs}, {says}")
