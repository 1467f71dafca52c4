import fnmatch
import json
import sys
from pathlib import Path

import pytest

from minidpo import data
from minidpo.data import PromptSampler, load_preferences, load_prompts

CHAT = [{"role": "user", "content": "Hi?"}]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    # CI installs pyarrow with the dev extra; skipping keeps a bare checkout's test run honest about it.
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def error(func, *args) -> str:
    """The message of the one-line error func(*args) raises."""
    with pytest.raises((ValueError, FileNotFoundError, ImportError)) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def prompt_column(*args, **kwargs) -> list:
    return [row["prompt"] for row in load_prompts(*args, **kwargs)]


# --- formats ---

def test_jsonl_standard_and_conversational_rows_other_columns_kept(tmp_path):
    # The other columns go to reward functions, as TRL passes them.
    rows = [{"prompt": "Say hi.", "completion": "hi"}, {"id": 3, "prompt": CHAT}]
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", rows)) == rows


def test_json_list_of_rows(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": CHAT}], indent=2))
    assert prompt_column(str(path)) == ["a", CHAT]


def test_json_file_holding_json_lines(tmp_path):
    # The datasets library reads JSON Lines from .json files; Hub repos rely on it.
    path = write_jsonl(tmp_path / "p.json", [{"prompt": "a"}, {"prompt": "b"}])
    assert prompt_column(str(path)) == ["a", "b"]


def test_jsonl_line_separator_inside_a_string(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one\u2028two"}\n', encoding="utf-8")
    assert prompt_column(str(path)) == ["one\u2028two"]


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": CHAT, "extra": 1}, {"prompt": CHAT, "extra": 2}])
    assert prompt_column(str(path)) == [CHAT, CHAT]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    path = tmp_path / "p.parquet"
    path.write_bytes(b"")
    message = error(load_prompts, str(path))
    assert str(path) in message and "pip install 'minidpo[parquet]'" in message


def test_shipped_demo_prompts_load():
    prompts = prompt_column(str(Path(data.__file__).with_name("prompts.jsonl")))
    assert 100 <= len(prompts) <= 160
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    assert len({p[0]["content"] for p in prompts}) == len(prompts)


# --- directories in the Hub layout, and the Hub ---

def test_directory_picks_the_split_files(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", [{"prompt": "b"}])
    write_jsonl(tmp_path / "data" / "test-00000-of-00001.jsonl", [{"prompt": "t"}])
    write_jsonl(tmp_path / ".cache" / "train.jsonl", [{"prompt": "hidden"}])  # huggingface_hub's local-dir metadata
    (tmp_path / "README.md").write_text("# card")
    assert prompt_column(str(tmp_path)) == ["a", "b"]
    assert prompt_column(str(tmp_path), split="test") == ["t"]
    message = error(load_prompts, str(tmp_path), "validation")
    assert message == f"{tmp_path}: no split 'validation'; available: test, train"


def test_directory_with_parquet_and_split_folders(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [{"prompt": "p"}])
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", [{"prompt": "v"}])
    assert prompt_column(str(tmp_path), "validation") == ["v"]
    # The Hub's parquet-conversion layout: {config}/{split}/0000.parquet
    write_parquet(tmp_path / "conv" / "default" / "train" / "0000.parquet", [{"prompt": "c"}])
    assert prompt_column(str(tmp_path / "conv")) == ["c"]


def test_directory_configuration(tmp_path):
    write_jsonl(tmp_path / "short" / "train.jsonl", [{"prompt": "s"}])
    write_jsonl(tmp_path / "long" / "train.jsonl", [{"prompt": "l"}])
    assert prompt_column(str(tmp_path), "train", "long") == ["l"]
    assert "no configuration 'medium'" in error(load_prompts, str(tmp_path), "train", "medium")


def test_hub_repo_downloads_only_the_split(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        write_jsonl(tmp_path / "data" / "train-00000-of-00001.jsonl", [{"prompt": "from the hub"}])
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert prompt_column("trl-lib/ultrafeedback-prompt") == ["from the hub"]
    (call,) = calls
    assert call["repo_id"] == "trl-lib/ultrafeedback-prompt" and call["repo_type"] == "dataset"
    wanted = ["data/train-00000-of-00001.parquet", "train.jsonl", "data/train.json", "default/train/0000.parquet"]
    unwanted = ["data/test-00000-of-00001.parquet", "train_prefs.jsonl", "README.md", "data/train-0.bin"]
    match = lambda name: any(fnmatch.fnmatch(name, p) for p in call["allow_patterns"])  # as huggingface_hub matches
    assert all(match(name) for name in wanted) and not any(match(name) for name in unwanted)


def test_hub_configuration_narrows_the_patterns(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    error(load_prompts, "owner/name", "train", "cfg")
    assert all(p.startswith("cfg/") for p in calls[0]["allow_patterns"])


def test_hub_failure_is_one_line_naming_the_repo(monkeypatch):
    def unreachable(**kwargs):
        raise OSError("Cannot reach https://huggingface.co\nmore detail")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    assert error(load_prompts, "owner/missing") == (
        "could not get dataset 'owner/missing' from the Hugging Face Hub or its cache: "
        "Cannot reach https://huggingface.co")


def test_missing_local_path(tmp_path):
    assert error(load_prompts, str(tmp_path / "nope.jsonl")).endswith("nope.jsonl: no such file or directory")
    assert "no such file" in error(load_prompts, "./prompts")


# --- bad input: file, row and column named ---

@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, "line 2: no 'prompt' column (columns: text)"),
    ({"prompt": 3}, "line 2: column 'prompt' must be a string or a list of role/content messages, got int"),
    ({"prompt": CHAT + [{"role": "user"}]}, "line 2: column 'prompt': message 1 needs string 'role' and 'content'"),
    ({"prompt": ["hi"]}, "line 2: column 'prompt': message 0 needs string 'role' and 'content'"),
    ({"prompt": "  "}, "line 2: column 'prompt' is empty"),
    ({"prompt": []}, "line 2: column 'prompt' is empty"),
    (["prompt"], "line 2: expected an object of columns, got list"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    assert error(load_prompts, str(path)) == f"{path}, {message}"


def test_bad_row_in_json_and_parquet_names_the_row(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}, {"prompt": ""}]))
    assert error(load_prompts, str(path)) == f"{path}, row 2: column 'prompt' is empty"
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a", "x": 1}, {"prompt": None, "x": 2}])
    assert error(load_prompts, str(path)) == f"{path}, row 1: column 'prompt' must be a string or a list of " \
                                             "role/content messages, got NoneType"


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    assert error(load_prompts, str(path)).startswith(f"{path}, line 3: malformed JSON: ")
    path = tmp_path / "p.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]')
    assert error(load_prompts, str(path)).startswith(f"{path}, line 3: malformed JSON: ")


def test_text_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert error(load_prompts, str(path)).startswith(f"{path}, line 2: not UTF-8 text (")


def test_empty_dataset_and_unsupported_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    assert error(load_prompts, str(path)) == f"{path}: split 'train' has no rows"
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhi\n")
    assert error(load_prompts, str(path)) == f"{path}: unsupported file type; use .jsonl, .json, .parquet"


# --- preferences ---

def test_preferences_standard(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "score": 1}])
    assert load_preferences(str(path)) == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]


def test_preferences_conversational_implicit_and_explicit_prompt(tmp_path):
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"chosen": CHAT + [good], "rejected": CHAT + [bad]},                    # implicit prompt
        {"prompt": CHAT, "chosen": CHAT + [good], "rejected": CHAT + [bad]},    # prompt repeated in both
        {"prompt": CHAT, "chosen": [good], "rejected": [bad]},                  # completions only
    ])
    assert load_preferences(str(path)) == [{"prompt": CHAT, "chosen": [good], "rejected": [bad]}] * 3


@pytest.mark.parametrize("row, message", [
    ({"chosen": "4", "rejected": "5"}, "no 'prompt' column (an implicit prompt needs message lists)"),
    ({"prompt": "q", "chosen": "4"}, "no 'rejected' column (columns: prompt, chosen)"),
    ({"prompt": "q", "chosen": CHAT, "rejected": CHAT},
     "'prompt', 'chosen' and 'rejected' must be all strings or all message lists"),
    ({"chosen": CHAT, "rejected": CHAT}, "column 'chosen' has nothing after the prompt"),
    ({"chosen": CHAT, "rejected": [{"role": "user", "content": "Other"}]},
     "no 'prompt' column, and 'chosen' and 'rejected' share no first message"),
    ({"prompt": "q", "chosen": "", "rejected": "5"}, "column 'chosen' is empty"),
])
def test_preference_errors(tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    assert error(load_preferences, str(path)) == f"{path}, line 1: {message}"


# --- batches under torchrun ---

def test_ranks_get_equal_full_batches_as_accelerate_deals_them():
    # 21 items in batches of 4: 6 batches, the last of 1 item, on 2 ranks: 3 rounds of 2 batches, the
    # last round filled up with the epoch's first 3 items (accelerate's even_batches).
    items = list(range(21))
    ranks = [PromptSampler(items, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
    batches = [list(s.batches(epoch=0)) for s in ranks]
    assert [len(b) for b in batches] == [3, 3] and ranks[0].batches_per_epoch == 3
    assert all(len(batch) == 4 for rank in batches for batch in rank)
    dealt = [x for j in range(6) for x in batches[j % 2][j // 2]]  # batch j went to rank j % 2
    order = dealt[:21]
    assert sorted(order) == items and dealt[21:] == order[:3]
    single = PromptSampler(items, batch_size=4, seed=1)  # one process keeps the last partial batch
    assert [len(b) for b in single.batches(0)] == [4, 4, 4, 4, 4, 1] and sum(single.batches(0), []) == order


def test_shuffle_is_deterministic_per_seed_and_epoch():
    items = list(range(64))
    order = lambda seed, epoch: list(PromptSampler(items, 8, seed=seed).batches(epoch))
    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert sorted(x for batch in order(3, 0) for x in batch) == items  # one rank sees every item once


def test_resume_from_a_position_is_exact():
    sampler = PromptSampler(list(range(50)), batch_size=5, rank=1, world_size=2, seed=7)
    full = list(sampler.batches(epoch=2))
    assert list(sampler.batches(epoch=2, start=3)) == full[3:]
    restarted = PromptSampler(list(range(50)), batch_size=5, rank=1, world_size=2, seed=7)  # a new process
    assert list(restarted.batches(epoch=2, start=3)) == full[3:]


def test_fewer_rows_than_the_ranks_take():
    # 3 rows for 2 ranks x 4: the order repeats until every rank has a full batch.
    batches = [list(PromptSampler(list(range(3)), batch_size=4, rank=r, world_size=2).batches(0)) for r in range(2)]
    dealt = batches[0][0] + batches[1][0]
    assert dealt == dealt[:3] * 2 + dealt[:2] and sorted(dealt[:3]) == [0, 1, 2]
