"""The metric logs survive a run killed in the middle of a write."""

import json
from types import SimpleNamespace

from minidpo.tracking import Tracker

ROWS = ['{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 0.4}', '{"step": 3, "loss": 0.3}']
CFG = SimpleNamespace(run_name=None, report_to=[])


def logged(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_torn_last_line_is_dropped_and_the_log_goes_on(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(ROWS) + '\n{"step": 4, "lo')
    Tracker(CFG, tmp_path, enabled=True, resume_step=2).log(3, 10, {"loss": 0.25})  # from checkpoint-2
    assert logged(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.25}]


def test_a_last_row_cut_before_its_newline_stays_a_row_of_its_own(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(ROWS))
    Tracker(CFG, tmp_path, enabled=True, resume_step=3).log(4, 10, {"loss": 0.2})
    assert [row["step"] for row in logged(tmp_path)] == [1, 2, 3, 4]


def test_a_fresh_run_starts_a_fresh_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(ROWS[0] + '\n{"step": 2, "lo')
    Tracker(CFG, tmp_path, enabled=True)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
