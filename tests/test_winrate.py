"""bench/winrate.py on two tiny random models with the rule judge `shorter`: the printed rate is the
count over the saved judgments, and the Wilson interval matches hand-computed values."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from pair_rm_world import save_pair_rm
from tiny_world import MODEL, WORDS, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import winrate  # noqa: E402
from minidpo.pair_rm import PairRMJudge  # noqa: E402


def test_wilson_interval_known_values():
    # 7/10 by hand: center (0.7 + 1.96²/20) / (1 + 1.96²/10) = 0.6445, half-width 0.2477.
    assert winrate.wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert winrate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not empty at 0/n
    assert winrate.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert winrate.wilson_interval(0, 0) == (0.0, 1.0)  # nothing decided: nothing known


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("winrate")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = str(save_model(root / name, T.LlamaForCausalLM(T.LlamaConfig(**MODEL, num_key_value_heads=2))))
    rows = [{"prompt": [{"role": "user", "content": " ".join(WORDS[i:i + 3])}]} for i in range(12)]
    paths["prompts"] = root / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def printed(capsys):
    line = capsys.readouterr().out
    rate, low, high, n, ties = re.search(
        r"Model win rate: ([\d.]+)% \(95% CI \[([\d.]+)%, ([\d.]+)%\], n=(\d+), ties=(\d+)", line).groups()
    return float(rate), float(low), float(high), int(n), int(ties)


def test_model_against_model(world, tmp_path, capsys):
    out = tmp_path / "judgments.jsonl"
    assert winrate.main(["--model_name_or_path", world["a"], "--baseline_model", world["b"], "--prompts",
                         str(world["prompts"]), "--max_new_tokens", "8", "--device", "cpu", "--judge", "shorter",
                         "--output", str(out)]) == 0
    rate, low, high, n, ties = printed(capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    # Count by hand from the saved texts, not from the saved verdicts.
    wins = sum(len(r["model"]) < len(r["baseline"]) for r in rows)
    losses = sum(len(r["model"]) > len(r["baseline"]) for r in rows)
    assert [r["winner"] for r in rows].count("model") == wins
    assert (n, ties) == (wins + losses, 12 - wins - losses)
    assert wins and losses  # two different random models: a real mix, not a degenerate case
    assert rate == pytest.approx(100 * wins / n, abs=0.005)
    assert (low, high) == pytest.approx(tuple(100 * x for x in winrate.wilson_interval(wins, n)), abs=0.005)


def test_model_against_reference_file(world, tmp_path, capsys):
    # Empty references beat any non-empty answer; references longer than 8 tokens lose to every answer.
    refs = [{"prompt": [{"role": "user", "content": WORDS[i]}], "completion": "" if i < 3 else "x" * 500}
            for i in range(10)]
    ref_file = tmp_path / "refs.jsonl"
    ref_file.write_text("".join(json.dumps(r) + "\n" for r in refs))
    out = tmp_path / "judgments.jsonl"
    assert winrate.main(["--model_name_or_path", world["a"], "--reference_file", str(ref_file),
                         "--max_new_tokens", "8", "--device", "cpu", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    empty = sum(r["model"] == "" for r in rows[:3])  # an empty answer ties with an empty reference
    assert [r["winner"] for r in rows] == ["tie" if r["model"] == "" else "baseline" for r in rows[:3]] + ["model"] * 7
    rate, _, _, n, ties = printed(capsys)
    assert (n, ties) == (10 - empty, empty)
    assert rate == pytest.approx(100 * 7 / n, abs=0.005)


def test_pair_rm_judge(world, tmp_path, capsys):
    """--judge pair_rm --judge_model DIR: the saved winners are PairRM's verdicts on the saved texts."""
    save_pair_rm(tmp_path / "pair_rm")
    out = tmp_path / "judgments.jsonl"
    assert winrate.main(["--model_name_or_path", world["a"], "--baseline_model", world["b"], "--prompts",
                         str(world["prompts"]), "--num_prompts", "6", "--max_new_tokens", "8", "--device", "cpu",
                         "--judge", "pair_rm", "--judge_model", str(tmp_path / "pair_rm"), "--output", str(out)]) == 0
    rate, low, high, n, ties = printed(capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    judge = PairRMJudge.from_pretrained(str(tmp_path / "pair_rm"))
    verdicts = judge.judge([r["prompt"] for r in rows], [(r["model"], r["baseline"]) for r in rows])
    assert [r["winner"] for r in rows] == [("model", "baseline")[v] for v in verdicts] and n + ties == 6
