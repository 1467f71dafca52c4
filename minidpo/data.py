"""Training data: prompt rows (online DPO), preference rows (reward models), and each process's batches of them.

A dataset is a local .jsonl / .json / .parquet file, a directory in the Hub's dataset layout
(`data/train-00000-of-00001.parquet`, `train.jsonl`, ...), or a Hub dataset repo id, of which only the requested
split's files are downloaded. A prompt is standard (a string) or conversational (a list of {"role", "content"}
messages); other columns go to reward functions, as in TRL. Bad input gets a one-line error naming the file,
the row (or JSONL line) and the column."""

import json
import math
import random
from pathlib import Path

from .common import hub_snapshot, optional_import

EXTENSIONS = (".jsonl", ".json", ".parquet")


def load_prompts(name_or_path: str, split: str = "train", config: str | None = None) -> list[dict]:
    """A split's rows: {"prompt": a string or messages for a chat template, the other columns as they are}."""
    return [row | {"prompt": _text(row, "prompt", where)} for where, row in split_rows(name_or_path, split, config)]


def load_preferences(name_or_path: str, split: str = "train", config: str | None = None) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected"}, the completions alone in chosen and rejected. Conversational rows
    often hold the whole conversation there: without a prompt column, the messages both start with are the prompt
    (an "implicit prompt"); with one, a copy of it at their start is cut off. String rows need a prompt column."""
    rows = []
    for where, row in split_rows(name_or_path, split, config):
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if "prompt" in row:
            prompt = _text(row, "prompt", where)
            n = len(prompt)
            if isinstance(prompt, list) and chosen[:n] == prompt == rejected[:n]:
                chosen, rejected = chosen[n:], rejected[n:]
        elif isinstance(chosen, list) and isinstance(rejected, list):
            n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise ValueError(f"{where}: no 'prompt' column, and 'chosen' and 'rejected' share no first message")
        else:
            raise ValueError(f"{where}: no 'prompt' column (an implicit prompt needs message lists)")
        if len({type(prompt), type(chosen), type(rejected)}) > 1:
            raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must be all strings or all message lists")
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise ValueError(f"{where}: column {column!r} has nothing after the prompt")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def split_rows(name_or_path: str, split: str, config: str | None) -> list[tuple[str, dict]]:
    """(where, row) pairs of all the split's files (see data_files and read_rows); never none."""
    rows = [pair for path in data_files(name_or_path, split, config) for pair in read_rows(path)]
    if not rows:
        raise ValueError(f"{name_or_path}: split {split!r} has no rows")
    return rows


def _text(row: dict, column: str, where: str) -> str | list[dict]:
    """A column's value if it is a non-empty string or list of role/content messages."""
    if column not in row:
        raise ValueError(f"{where}: no {column!r} column (columns: {', '.join(row) or 'none'})")
    value = row[column]
    if isinstance(value, list):
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: column {column!r}: message {i} needs string 'role' and 'content'")
    elif not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must be a string or a list of role/content messages, "
                         f"got {type(value).__name__}")
    if not (value.strip() if isinstance(value, str) else value):
        raise ValueError(f"{where}: column {column!r} is empty")
    return value


def data_files(name_or_path: str, split: str = "train", config: str | None = None) -> list[Path]:
    """The files holding `split`: the file itself, or those of a dataset directory or Hub repo. In a directory, a
    file belongs to the split its name starts with (train-00000-of-00001.parquet, train.jsonl) or, in the Hub's
    parquet-conversion layout (train/0000.parquet), to its folder's. `config` names a subdirectory."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        # Anything that cannot be an "owner/name" repo id was meant as a local path.
        if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(EXTENSIONS) or name_or_path.count("/") > 1:
            raise FileNotFoundError(f"{name_or_path}: no such file or directory")
        # The file names this function recognises, at the top or in any folder (fnmatch's * crosses "/").
        prefix = f"{config}/" if config else ""
        globs = [split, f"{split}-*", f"{split}/*", f"*/{split}", f"*/{split}-*", f"*/{split}/*"]
        patterns = [prefix + glob + ext for glob in globs for ext in EXTENSIONS]
        path = hub_snapshot(name_or_path, f"dataset {name_or_path!r}", repo_type="dataset", allow_patterns=patterns)
    root = path / config if config else path
    if not root.is_dir():
        raise FileNotFoundError(f"{name_or_path}: no configuration {config!r} (expected a subdirectory {root})")
    splits = {}
    for file in sorted(root.rglob("*")):
        if file.suffix in EXTENSIONS and file.is_file() and not any(p.startswith(".") for p in file.parts):
            name = file.stem.split("-")[0]
            splits.setdefault(file.parent.name if name.isdigit() else name, []).append(file)
    if split not in splits:
        raise ValueError(f"{name_or_path}: no split {split!r}; available: {', '.join(sorted(splits)) or 'none'}")
    return splits[split]


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a file; `where` names the file and the row, or the line in JSON Lines."""
    if path.suffix == ".parquet":
        pq = optional_import("pyarrow.parquet", f"reading {path} needs pyarrow", "'minidpo[parquet]'")
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    elif path.suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = [(f"{path}, row {i}", row) for i, row in enumerate(_json(text, path, 0))]
        else:  # JSON Lines; the datasets library reads them from .json files too, and Hub repos rely on it
            # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines() breaks on.
            rows = [(f"{path}, line {n}", _json(line, path, n))
                    for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        raise ValueError(f"{path}: unsupported file type; use {', '.join(EXTENSIONS)}")
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object of columns, got {type(row).__name__}")
    return rows


def _json(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line or e.lineno}: malformed JSON: {e.msg}") from None
    except RecursionError:  # [[[[... nested deeper than Python's stack
        raise ValueError(f"{path}, line {line or 1}: JSON nested too deeply") from None


class PromptSampler:
    """One process's batches of each epoch, resumable at any (epoch, batch index), as HF's Trainer (under
    accelerate) deals them. Each epoch shuffles the dataset with a generator seeded by (seed, epoch), so ranks
    agree on the order without talking; batch j goes to rank j % world_size. One process keeps a last partial
    batch. Several must run the same number of equal batches (a rank with one step more would hang in a
    collective), so, as accelerate's even_batches, the epoch's last round is filled up with its first prompts."""

    def __init__(self, items: list, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 42):
        self.items, self.batch_size, self.rank, self.world_size, self.seed = items, batch_size, rank, world_size, seed
        self.batches_per_epoch = math.ceil(len(items) / (world_size * batch_size))

    def batches(self, epoch: int, start: int = 0):
        """Yield this rank's batches (lists of batch_size items) of `epoch`, from batch index `start` on."""
        order = list(range(len(self.items)))
        # A string seed is hashed with SHA-512, so every process derives the same generator from (seed, epoch).
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        if self.world_size > 1:
            dealt = self.batches_per_epoch * self.world_size * self.batch_size
            order = (order * math.ceil(dealt / len(order)))[:dealt]
        for b in range(start, self.batches_per_epoch):
            first = (b * self.world_size + self.rank) * self.batch_size
            yield [self.items[i] for i in order[first:first + self.batch_size]]
