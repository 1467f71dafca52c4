"""minidpo.plot on a real (tiny) training log: a PNG is written; without matplotlib, one line naming
the extra."""

import subprocess
import sys

import pytest

import train
from minidpo import plot
from tiny_world import WORDS, tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    model = tiny_llama(root)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": " ".join(WORDS[i:i + 4])} for i in range(8)])
    out = root / "out"
    assert train.main(["--model_name_or_path", str(model), "--dataset_name", str(prompts), "--output_dir", str(out),
                       "--max_new_tokens", "8", "--max_length", "64", "--logging_steps", "1", "--save_steps", "0",
                       "--reward_funcs", "minidpo.judges:brevity", "--max_steps", "4"]) == 0
    return out


def test_png_from_training_log(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert plot.main([str(run_dir), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 2_000_000
    # The default: metrics.png beside the log, also through the command line.
    result = subprocess.run([sys.executable, "-m", "minidpo.plot", str(run_dir / "metrics.jsonl")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_names_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot.main([str(run_dir), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: plotting needs matplotlib: pip install 'minidpo[plot]'"]
