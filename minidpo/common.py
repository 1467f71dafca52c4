"""Helpers any module may use; this one imports nothing of minidpo, so imports flow one way: one-line
errors, Hub downloads, JSON files written, or read and their keys checked (a downloaded config.json is untrusted
input), and the one convention for writing a directory safely (a crash never leaves a half-written one)."""

import importlib
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


def error_line(e: BaseException) -> str:
    """An exception as one line for the user: its message's first line, or its type if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def optional_import(module: str, needs: str, install: str):
    """`module`, imported for an optional feature; if missing, one line: `needs`, then `pip install {install}`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{needs}: pip install {install}") from None


def hub_snapshot(repo_id: str, what: str, **options) -> Path:
    """The files of a Hub repo (allow_patterns and repo_type in `options`), downloaded or found in the HF
    cache by huggingface_hub (HF_HUB_OFFLINE=1 is honoured); `what` names the repo in the error line."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, **options))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise FileNotFoundError(f"could not get {what} from the Hugging Face Hub or its cache: "
                                f"{error_line(e)}") from None


def print_error(message: str):
    print(f"error: {message}", file=sys.stderr)


def read_json(path: Path) -> dict:
    """The JSON object in a file; a missing file, bad JSON or another JSON type gets an error naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({error_line(e)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def write_json(path: Path, value):
    Path(path).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_keys(values: dict, rules: dict, where) -> dict:
    """values, once every key of `rules` that it holds (null counts as absent) passes its rule, a
    (description, test) pair; otherwise a one-line error naming `where` and the key."""
    for key, (wanted, ok) in rules.items():
        if values.get(key) is not None and not ok(values[key]):
            raise ValueError(f"{where}: {key!r} must be {wanted}, got {json.dumps(values[key])[:60]}")
    return values


# Rules for check_keys. JSON's true is an int to Python (bool subclasses int), hence `type(v) is int`.
SIZE = ("a positive integer", lambda v: type(v) is int and v > 0)
COUNT = ("a non-negative integer", lambda v: type(v) is int and v >= 0)
NUMBER = ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v))
FLAG = ("true or false", lambda v: type(v) is bool)
TEXT = ("a string", lambda v: isinstance(v, str))
OBJECT = ("an object", lambda v: isinstance(v, dict))
TOKEN_IDS = ("a token id or a list of token ids",
             lambda v: COUNT[1](v) or isinstance(v, list) and all(COUNT[1](i) for i in v))


def cache_dir() -> Path:
    """Where minidpo keeps what it builds once per machine (the offline model, the CPU matmul choices):
    $MINIDPO_CACHE, or ~/.cache/minidpo."""
    return Path(os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo").expanduser()


def temp_name(target: Path) -> Path:
    return Path(target).with_name(f".{Path(target).name}.tmp")


def temp_dir_beside(target: Path) -> Path:
    """A new, empty hidden directory `.NAME.tmp` next to `target`, to build it in and rename into place
    (replace_dir). The name is fixed (every rank of a run finds it), so a crashed run's leftover is removed
    here; a plain mkdir gives it the permissions the umask allows, as the final directory should have."""
    tmp = temp_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def building_beside(target: Path):
    """temp_dir_beside(target), for the block to build in and rename into place; removed if the block fails."""
    tmp = temp_dir_beside(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path):
    """Move `new` to `target`; an existing target is swapped out first and removed only after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)
