"""FSDP2 across two CPU processes (gloo), started with torchrun from here; tests/distributed_run.py
is what each rank runs. Two ranks with batch b take the same step as one process with batch 2b,
gradient checkpointing changes nothing, a resumed run continues exactly, the exported model
(gathered to rank 0) loads in transformers, and the reference's 1B command runs with its
metrics reduced over both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import minidpo
from tiny_world import MODEL, VOCAB, WORDS, save_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "distributed_run.py"

MODEL = {**MODEL, "num_key_value_heads": 2}


def save_with_tokenizer(model, path: Path) -> str:
    return str(save_model(path, model))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A JSON file of the tiny models' and prompts' paths, for the rank script."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    paths = {"llama": save_with_tokenizer(T.LlamaForCausalLM(T.LlamaConfig(**MODEL)), root / "llama"),
             "llama_rm": save_with_tokenizer(T.LlamaForSequenceClassification(T.LlamaConfig(**MODEL, num_labels=1)),
                                             root / "llama_rm")}
    rows = [{"prompt": [{"role": "user", "content": " ".join(WORDS[3 + (i * 7 + j * 3) % (len(WORDS) - 3)] for j in range(2 + i % 5))}]}
            for i in range(32)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["prompts"] = str(root / "prompts.jsonl")
    (root / "world.json").write_text(json.dumps(paths))
    return root / "world.json"


def launch(mode: str, world: Path, out: Path, ranks: int = 2):
    # One thread per process: two processes share two cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIDPO_DEBUG="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    result = subprocess.run([*launcher, str(SCRIPT), mode, str(world), str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def equivalence(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("equivalence")
    launch("equivalence", world, out, ranks=1)
    launch("equivalence", world, out, ranks=2)
    return out


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    launch("runs", world, out)
    return out


def assert_same_tensors(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_two_ranks_take_the_step_of_one_process_with_twice_the_batch(equivalence):
    # Ranks with batch 2 and 2 micro-batches each against one process with batch 8, same completions.
    single, sharded = (json.loads((equivalence / f"{t}.json").read_text()) for t in ("single", "plain"))
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert sharded["grad_norm"] == pytest.approx(single["grad_norm"], abs=1e-5)
    assert single["grad_norm"] > 0
    assert_same_tensors(load_file(equivalence / "plain.safetensors"), load_file(equivalence / "single.safetensors"),
                        atol=1e-5)


def test_best_of_4_pairs_on_two_ranks_take_the_step_of_one_process(equivalence):
    single, sharded = (json.loads((equivalence / f"{t}.json").read_text()) for t in ("single_best_of_4", "best_of_4"))
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert sharded["grad_norm"] == pytest.approx(single["grad_norm"], abs=1e-5) and single["grad_norm"] > 0
    assert_same_tensors(load_file(equivalence / "best_of_4.safetensors"),
                        load_file(equivalence / "single_best_of_4.safetensors"), atol=1e-5)


def test_gradient_checkpointing_under_fsdp_changes_nothing(equivalence):
    plain, checkpointed = (json.loads((equivalence / f"{t}.json").read_text()) for t in ("plain", "checkpointed"))
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    assert_same_tensors(load_file(equivalence / "checkpointed.safetensors"),
                        load_file(equivalence / "plain.safetensors"), atol=1e-6)


def test_bf16_rollout_under_fsdp_uses_a_bf16_cache(equivalence):
    result = json.loads((equivalence / "bf16.json").read_text())
    assert result["cache_dtype"] == "torch.bfloat16"
    assert result["loss"] == pytest.approx(0.6931, abs=1e-2)  # policy = reference at step 1: log 2


def test_resume_on_two_ranks_continues_exactly(runs):
    straight, resumed = runs / "straight", runs / "resumed"
    assert_same_tensors(load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors"), atol=0)

    def rows(out):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k not in ("step_time", "tokens_per_second")}
                for r in lines}

    straight_rows, resumed_rows = rows(straight), rows(resumed)
    assert sorted(resumed_rows) == [3, 4]
    for step in (3, 4):
        assert resumed_rows[step] == pytest.approx(straight_rows[step], abs=1e-6)


def test_exported_model_loads_in_transformers(runs, world):
    out = runs / "straight"
    ids = torch.tensor([[VOCAB[w] for w in "<|im_start|> user hello world <|im_end|> <|im_start|> assistant".split()]])
    theirs = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = theirs(ids).logits
        ours = minidpo.load_model(str(out))(ids, torch.ones_like(ids))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    initial = load_file(Path(json.loads(world.read_text())["llama"]) / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert initial.keys() == trained.keys()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)


def test_reference_1b_command_runs_with_metrics_over_both_ranks(runs):
    assert [(runs / f"exit-rank{r}").read_text() for r in (0, 1)] == ["0", "0"]
    out = runs / "pythia-1b-deduped-tldr-online-dpo"
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-1").is_dir()
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    windows = [json.loads((runs / f"window-rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)]
    # Each rank sampled its own prompts: the logged mean is over both ranks' sums and counts.
    for name in ("objective/scores", "objective/kl", "val/contain_eos_token"):
        (s0, c0), (s1, c1) = windows[0][name], windows[1][name]
        assert logged[name] == pytest.approx((s0 + s1) / (c0 + c1), abs=1e-5), name
    (s0, c0), (s1, c1) = windows[0]["objective/scores"], windows[1]["objective/scores"]
    assert abs(s0 / c0 - s1 / c1) > 1e-4  # so rank 0 alone would have logged something else


def test_lora_on_two_ranks_takes_the_step_of_one_process_and_resumes_exactly(world, tmp_path):
    launch("lora", world, tmp_path, ranks=1)
    launch("lora", world, tmp_path, ranks=2)
    single, sharded = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("single", "plain"))
    assert sharded == pytest.approx(single, abs=1e-5) and single["grad_norm"] > 0
    bf16_base = json.loads((tmp_path / "bf16_base.json").read_text())
    assert bf16_base == pytest.approx(single, rel=0.05)
    tensors = load_file(tmp_path / "plain.safetensors")
    assert tensors and all(".lora_" in name for name in tensors)  # only the adapters have gradients and weights out
    assert_same_tensors(tensors, load_file(tmp_path / "single.safetensors"), atol=1e-5)
    straight, resumed = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("straight", "resumed"))
    assert_same_tensors(resumed, straight, atol=0)
