"""End-to-end tests of the trainer and train.py on tiny random models (a word-level tokenizer and a
2-layer Llama or GPT-NeoX saved by transformers): a rule preference is learned, the logged metrics
and the schedule follow the reference, resuming continues exactly, the outputs load in
transformers, the reward-model objective learns, bad input stops with one line and loses nothing,
and the reference's example commands run."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import minidpo
from fakes import FixedSampler
from minidpo import outputs
from minidpo import trainer as trainer_module
from minidpo.config import parse_args
from minidpo.trainer import Trainer
from tiny_world import EOS, PAD, SPECIALS, VOCAB, WORDS, base, crash_before_step, run, words, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean(rows, name):
    return sum(r[name] for r in rows) / len(rows)


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


RULE = ["--reward_funcs", "minidpo.judges:brevity", "--missing_eos_penalty", 1.0]


# ---------------------------------------------------------------------------------------------
# 1. Learning: a rule preference (short, finished answers) is learned in 50 steps.


def test_rule_reward_is_learned(world, tmp_path):
    out = tmp_path / "out"
    assert run(base(world, out, *RULE, "--max_steps", 50, "--learning_rate", 3e-3,
                    "--per_device_train_batch_size", 8)) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 51))
    first, last = rows[:10], rows[-10:]
    # From about -1.2 (most completions cut off at 8 tokens) to about -0.6; margins from ~0 to ~0.1.
    assert mean(last, "objective/scores") > mean(first, "objective/scores") + 0.3
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.05
    assert mean(last, "val/contain_eos_token") > mean(first, "val/contain_eos_token") + 0.25
    assert mean(last, "objective/kl") > 0.1  # the policy moved away from the reference


def test_pairwise_judge_is_learned(world, tmp_path):
    out = tmp_path / "out"
    assert run(base(world, out, "--judge", "shorter", "--max_steps", 50, "--learning_rate", 3e-3,
                    "--per_device_train_batch_size", 8)) == 0
    rows = metrics(out)
    assert all("objective/scores" not in r and "objective/scores_margin" not in r for r in rows)  # no scores
    assert all("rewards/margins" in r and "judge/undecided" in r for r in rows)
    first, last = rows[:10], rows[-10:]
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.05
    assert mean(last, "val/contain_eos_token") > mean(first, "val/contain_eos_token") + 0.25


# ---------------------------------------------------------------------------------------------
# 2. Loss and metric plumbing.

REFERENCE_METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                     "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                     "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                     "val/contain_eos_token", "beta"]


def hf_linear_schedule(step: int, warmup: int, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup multiplier at scheduler step `step`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def test_metrics_beta_per_epoch_and_schedule(world, tmp_path):
    prompts = write_jsonl(tmp_path / "four.jsonl", [{"prompt": words(i, 4)} for i in range(4)])
    out = tmp_path / "out"
    # 4 prompts in batches of 2: 2 steps per epoch, 3 epochs, 6 steps.
    assert run(base(world, out, *RULE, "--dataset_name", prompts, "--per_device_train_batch_size", 2,
                    "--num_train_epochs", 3, "--beta", 0.2, 0.1, "--learning_rate", 1e-3, "--warmup_steps", 2,
                    "--log_completions_steps", 1)) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    first = rows[0]
    for name in REFERENCE_METRICS + ["loss", "learning_rate", "grad_norm", "epoch"]:
        assert name in first and math.isfinite(first[name]), name

    # Step 1: the policy is the reference, so KL and the implicit rewards are exactly zero.
    for name in ("objective/kl", "objective/non_score_reward", "rewards/chosen", "rewards/rejected",
                 "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, name
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-7)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigma(0)
    assert first["objective/entropy"] > 0 and first["logps/chosen"] < 0 and first["grad_norm"] > 0

    # The scores are brevity minus the EOS penalty of the logged completions, chosen the better one.
    table = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for step, row in zip((1, 2, 3, 4, 5, 6), rows):
        pairs = [t for t in table if t["step"] == step]
        assert len(pairs) == 2
        scores = [s for t in pairs for s in (t["chosen_score"], t["rejected_score"])]
        assert row["objective/scores"] == pytest.approx(sum(scores) / 4, abs=1e-6)
        assert row["objective/scores_margin"] == pytest.approx(
            sum(t["chosen_score"] - t["rejected_score"] for t in pairs) / 2, abs=1e-6)
        ended = []
        for t in pairs:
            assert t["chosen_score"] >= t["rejected_score"]
            for side in ("chosen", "rejected"):
                penalty = -len(t[side]) / 100 - t[f"{side}_score"]
                assert penalty == pytest.approx(0, abs=1e-6) or penalty == pytest.approx(1, abs=1e-6)
                ended.append(penalty < 0.5)
        assert row["val/contain_eos_token"] == pytest.approx(sum(ended) / 4)

    # A beta list gives one beta per epoch, the last one kept.
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # epochs done, as HF logs them
    assert [r["beta"] for r in rows] == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    # Linear warm-up over 2 steps, then linear decay to 0 at step 6; each row logs the rate its step used.
    expected = [1e-3 * hf_linear_schedule(s - 1, 2, 6) for s in range(1, 7)]
    assert [r["learning_rate"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert expected[:3] == pytest.approx([0, 5e-4, 1e-3])
    # Step 1 ran at rate 0, so step 2 still samples from the reference's weights.
    assert rows[1]["objective/kl"] == 0.0 and rows[2]["objective/kl"] != 0.0


def test_a_log_window_averages_the_metrics_and_keeps_the_last_steps_rate_and_norm(world, tmp_path):
    """HF's Trainer logs loss as the window's mean but grad_norm and learning_rate of its last step."""
    def logged(out, every):
        argv = base(world, out, *RULE, "--max_steps", 6, "--learning_rate", 1e-3, "--warmup_steps", 2,
                    "--per_device_train_batch_size", 4, "--logging_steps", every)
        assert run(argv) == 0
        return metrics(out)

    each, windows = logged(tmp_path / "each", 1), logged(tmp_path / "windows", 3)
    assert [r["step"] for r in windows] == [3, 6]
    for window, last in zip(windows, (each[2], each[5])):
        steps = each[window["step"] - 3:window["step"]]
        for name in ("loss", "objective/kl", "objective/scores"):
            assert window[name] == pytest.approx(sum(r[name] for r in steps) / 3, abs=1e-6), name
        for name in ("grad_norm", "learning_rate", "epoch"):
            assert window[name] == pytest.approx(last[name], rel=1e-6), name
    assert each[1]["grad_norm"] != each[2]["grad_norm"]  # so the means would differ from the last values


class PlainPromptsOnly:
    """A preference that leaves the conversational prompts' pairs undecided, recording how many it decided."""

    def __init__(self, preference, decided: list):
        self.preference, self.decided = preference, decided

    def __call__(self, rows, completions, has_eos, n, **kwargs):
        chosen, rejected, _, scores = self.preference(rows, completions, has_eos, n, **kwargs)
        valid = torch.tensor([isinstance(row["prompt"], str) for row in rows])
        self.decided.append(int(valid.sum()))
        return chosen, rejected, valid, scores


def first_gradient(argv, decided=None) -> tuple[list[torch.Tensor], dict]:
    t = Trainer(parse_args([str(a) for a in argv]))
    t.sampler = FixedSampler(len(SPECIALS), len(VOCAB))
    if decided is not None:
        t.preference = PlainPromptsOnly(t.preference, decided)
    grads = []
    t.optimizer.register_step_pre_hook(
        lambda *_: grads.extend(p.grad.clone() for p in t.policy.parameters()))
    batches = t.micro_batches()
    step_metrics, grad_norm = t.train_step([next(batches) for _ in range(t.cfg.gradient_accumulation_steps)])
    return grads, {k: (s / c).item() for k, (s, c) in step_metrics.items()} | {"grad_norm": grad_norm.item()}


@pytest.mark.parametrize("undecided, samples", [(False, 2), (True, 2), (False, 4)])
def test_gradient_accumulation_equals_the_full_batch(world, tmp_path, undecided, samples):
    decided = [] if undecided else None  # the judge leaves the conversational prompts' pairs undecided
    common = base(world, tmp_path / "out", *RULE, "--max_steps", 1, "--max_grad_norm", 0, "--num_generations", samples)
    accumulated, m_acc = first_gradient(common + ["--per_device_train_batch_size", 2,
                                                  "--gradient_accumulation_steps", 2], decided)
    full, m_full = first_gradient(common + ["--per_device_train_batch_size", 4], decided)
    if undecided:  # micro-batches with different numbers of decided pairs: a mean of means would differ
        assert decided[0] != decided[1] and decided[0] + decided[1] == decided[2] > 0
    assert m_acc["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert m_acc["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-5) and m_full["grad_norm"] > 0
    for a, b in zip(accumulated, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_best_of_4_pairs_the_highest_and_lowest_scores(world, tmp_path):
    t = Trainer(parse_args([str(a) for a in base(world, tmp_path / "out", *RULE, "--num_generations", 4,
                                                 "--per_device_train_batch_size", 6, "--max_steps", 1)]))
    prompts = next(t.micro_batches())[1]
    rollout = t.rollout(prompts, 0.1)
    # brevity: minus the text's length / 100, and -1 without EOS: recompute every sample's score.
    texts = t.tokenizer.batch_decode(rollout.completion_ids.flatten(0, 1).tolist())
    assert rollout.scores.shape == rollout.has_eos.shape == (6, 4)
    for b in range(6):
        chosen, rejected = texts[2 * b], texts[2 * b + 1]
        want = lambda text, eos: -len(text) / 100 - (0.0 if eos else 1.0)  # noqa: E731
        assert rollout.scores[b, 0].item() == pytest.approx(want(chosen, rollout.has_eos[b, 0]))
        assert rollout.scores[b, 1].item() == pytest.approx(want(rejected, rollout.has_eos[b, 1]))
        assert rollout.scores[b, 0] == rollout.scores[b].max() and rollout.scores[b, 1] == rollout.scores[b].min()
        assert bool(rollout.decided[b]) == bool(rollout.scores[b].max() > rollout.scores[b].min())


def test_simpo_builds_and_runs_no_reference_and_logs_no_kl(world, tmp_path):
    out = tmp_path / "out"
    argv = base(world, out, *RULE, "--loss_type", "simpo", "--rpo_alpha", 0.5, "--max_steps", 2,
                "--per_device_train_batch_size", 4)
    assert Trainer(parse_args([str(a) for a in argv])).reference is None
    assert run(argv) == 0
    for row in metrics(out):
        assert not {"objective/kl", "objective/non_score_reward", "objective/rlhf_reward", "rewards/margins"} & row.keys()
        assert {"loss", "logps/chosen", "objective/scores", "objective/entropy"} <= row.keys()


# ---------------------------------------------------------------------------------------------
# 3. Resuming continues exactly; checkpoints are complete and pruned. 4. The outputs.

VOLATILE = ("step_time", "tokens_per_second")  # wall-clock figures, different in every run


def steady(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def resume_argv(world, out):
    # Two micro-batches of 4 per step over 32 prompts: step 5 ends inside epoch 1.
    return base(world, out, *RULE, "--max_steps", 10, "--learning_rate", 3e-3, "--per_device_train_batch_size", 4,
                "--gradient_accumulation_steps", 2, "--save_steps", 5, "--log_completions_steps", 5)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """Ten steps in one go (checkpoint-5 on the way), shared by the resume and output tests."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert run(resume_argv(world, out)) == 0
    return out


def test_resume_continues_exactly(world, straight, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_before_step(monkeypatch, 7)
    assert run(resume_argv(world, out)) == 1
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]  # step 6 was logged after the checkpoint
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()

    assert run(resume_argv(world, out) + ["--resume_from_checkpoint", out / "checkpoint-5"]) == 0
    ours, theirs = metrics(out), metrics(straight)
    assert [r["step"] for r in ours] == list(range(1, 11))  # step 6 logged once, not twice
    assert steady(ours) == steady(theirs)
    assert (out / "completions.jsonl").read_text() == (straight / "completions.jsonl").read_text()
    resumed, reference = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_checkpoints_pruned_complete_and_newest_resumed(world, tmp_path):
    out = tmp_path / "out"
    argv = base(world, out, *RULE, "--max_steps", 8, "--learning_rate", 3e-3, "--per_device_train_batch_size", 4,
                "--save_steps", 2, "--save_total_limit", 2)
    assert run(argv) == 0
    # Saved at 2, 4, 6 (step 8 is the final model itself); the limit keeps the newest two.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]
    (out / "checkpoint-best").mkdir()  # a user's own directory: neither a checkpoint to resume nor to prune
    for step in (4, 6):
        checkpoint = out / f"checkpoint-{step}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
        assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
        minidpo.load_model(str(checkpoint))  # the policy in the HF layout
    final = load_file(out / "model.safetensors")

    resumed = Trainer(parse_args([str(a) for a in argv] + ["--resume_from_checkpoint", "true"]))
    assert resumed.step == 6  # "true" picks the newest checkpoint
    resumed.train()
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], final[name]) for name in final)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary directories left
    assert (out / "checkpoint-best").is_dir()


@pytest.mark.parametrize("old_shards, new_shards", [(True, True), (False, True), (True, False)])
def test_a_crash_while_publishing_never_mixes_two_models(world, tmp_path, monkeypatch, old_shards, new_shards):
    """The final model is moved into output_dir file by file; a crash after any move leaves the old
    model, the new one, or one that does not load, never a blend."""
    old, new = minidpo.load_model(world["llama"]), minidpo.load_model(world["llama"])
    with torch.no_grad():
        for weight in new.parameters():  # every tensor differs, so any blend shows
            weight.add_(1.0)
    shard_bytes = lambda sharded: 40_000 if sharded else 2**30
    real_replace = os.replace
    for crash_after in range(100):  # each number of files moved before the crash, until all are
        target, tmp = tmp_path / f"out{crash_after}", tmp_path / f"new{crash_after}"
        minidpo.save_pretrained(old, target, max_shard_bytes=shard_bytes(old_shards))
        tmp.mkdir()
        outputs.write_pretrained(new.state_dict(), new.cfg, tmp, None, shard_bytes(new_shards))
        if crash_after >= len(list(tmp.iterdir())):
            break
        moves = []

        def crashing_replace(src, dst):
            if len(moves) == crash_after:
                raise KeyboardInterrupt("killed")
            moves.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(outputs.os, "replace", crashing_replace)
        with pytest.raises(KeyboardInterrupt):
            outputs.publish(tmp, target)
        monkeypatch.setattr(outputs.os, "replace", real_replace)
        try:
            loaded = minidpo.load_model(str(target)).embed.weight
        except (FileNotFoundError, ValueError):
            continue
        assert torch.equal(loaded, old.embed.weight) or torch.equal(loaded, new.embed.weight), crash_after
        state = minidpo.load_model(str(target)).state_dict()
        which = old if torch.equal(loaded, old.embed.weight) else new
        assert all(torch.equal(state[k], v) for k, v in which.state_dict().items()), crash_after


def test_final_model_loads_in_transformers(world, straight):
    assert (straight / "README.md").read_text().startswith("---\nlibrary_name: minidpo")
    assert "for 10 steps" in (straight / "README.md").read_text()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (straight / name).is_file(), name

    ours = minidpo.load_model(str(straight))
    theirs = T.AutoModelForCausalLM.from_pretrained(straight).eval()
    trained = load_file(straight / "model.safetensors")
    initial = load_file(Path(world["llama"]) / "model.safetensors")
    assert not torch.equal(trained["lm_head.weight"], initial["lm_head.weight"])
    ids = torch.tensor([[VOCAB[w] for w in words(i, 6).split()] for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-4)

    # The saved tokenizer renders and encodes chats as transformers' own tokenizer does.
    hf_tok = T.AutoTokenizer.from_pretrained(straight)
    tok = minidpo.Tokenizer.from_dir(straight)
    chat = [{"role": "user", "content": words(3, 5)}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_completions_table(straight):
    table = [json.loads(line) for line in (straight / "completions.jsonl").read_text().splitlines()]
    # Every 5 steps, the rows of both micro-batches of 4 prompts.
    assert [t["step"] for t in table] == [5] * 8 + [10] * 8
    for t in table:
        assert {"prompt", "chosen", "rejected", "decided", "chosen_score", "rejected_score"} <= t.keys()
        assert t["chosen_score"] >= t["rejected_score"] and t["decided"]
    # Conversational prompts went through the chat template; standard ones are as they were.
    chats = [t["prompt"] for t in table if t["prompt"].startswith("<|im_start|>user\n")]
    assert chats and all(c.endswith("<|im_start|>assistant\n") for c in chats)
    assert any("<|im_start|>" not in t["prompt"] for t in table)


def test_tensorboard_receives_the_logged_metrics(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert run(base(world, out, "--reward_funcs", "minidpo.judges:brevity", "--max_steps", 3,
                    "--report_to", "tensorboard", "--run_name", "demo")) == 0
    events = EventAccumulator(str(out / "runs" / "demo"))
    events.Reload()
    logged = metrics(out)
    for name in ("objective/scores", "rewards/margins", "loss"):
        assert [e.step for e in events.Scalars(name)] == [1, 2, 3]
        assert [e.value for e in events.Scalars(name)] == pytest.approx([r[name] for r in logged])


# ---------------------------------------------------------------------------------------------
# 5. The reward-model objective (Bradley-Terry) learns a marker word and saves a classifier
# that transformers loads.


def preference_rows(n: int) -> list[dict]:
    """Conversational rows whose chosen answer is the rejected one with one word replaced by "good"."""
    filler = [w for w in WORDS[3:] if w != "good"]
    rows = []
    for i in range(n):
        rejected = [filler[(i * 5 + j * 3 + 1) % len(filler)] for j in range(4)]
        chosen = list(rejected)
        chosen[i % 4] = "good"
        rows.append({"prompt": [{"role": "user", "content": words(i, 2 + i % 3).replace("good", "bad")}],
                     "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
                     "rejected": [{"role": "assistant", "content": " ".join(rejected)}]})
    return rows


def test_reward_objective_learns_and_loads_in_transformers(world, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(64))
    out = tmp_path / "rm"
    assert run(base(world, out, "--objective", "reward", "--dataset_name", prefs, "--max_steps", 30,
                    "--learning_rate", 1e-3, "--per_device_train_batch_size", 8)) == 0
    rows = metrics(out)
    assert mean(rows[-5:], "rewards/accuracies") >= 0.95
    assert rows[0]["loss"] > 0.5 and mean(rows[-5:], "loss") < 0.3
    assert mean(rows[-5:], "rewards/margins") > mean(rows[:5], "rewards/margins") + 1

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    ours = minidpo.load_model(str(out))
    theirs = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert theirs.config.pad_token_id == PAD != EOS  # transformers reads the score before the first pad
    tok = minidpo.Tokenizer.from_dir(out)
    held_out = preference_rows(67)[64:]
    texts = [tok.apply_chat_template(r["prompt"] + r[side]) for r in held_out for side in ("chosen", "rejected")]
    ids, mask = tok(texts, padding_side="right")
    assert mask.sum(1).unique().numel() > 1  # rows of different lengths: the padding matters
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(minidpo.last_token_scores(ours(ids, mask), mask), expected, rtol=0, atol=1e-4)
    assert (expected[0::2] > expected[1::2]).all()  # and it prefers the marker on rows it never saw


# ---------------------------------------------------------------------------------------------
# 6. Bad input: one line on stderr that names the problem, and nothing lost.


def one_error_line(capsys) -> str:
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--judge", "shorter", "--reward_model_path", "rm"], "either --judge or --reward_model_path"),
    ([], "needs --judge, --reward_model_path or --reward_funcs"),
    (["--judge", "shorter", "--max_new_tokens", 64, "--max_length", 64], "--max_new_tokens (64) must be smaller"),
    (["--judge", "shorter", "--not_a_flag", 3], "unrecognized arguments: --not_a_flag"),
    (["--judge", "shorter", "--deepspeed", "zero2.json"], "--deepspeed: minidpo shards with FSDP2"),
])
def test_bad_flags_exit_2_with_one_line(world, tmp_path, capsys, extra, message):
    argv = ["--model_name_or_path", world["llama"], "--dataset_name", world["prompts"], "--output_dir", tmp_path]
    with pytest.raises(SystemExit) as exit_info:
        run(argv + extra)
    assert exit_info.value.code == 2
    assert message in one_error_line(capsys)
    assert not any(tmp_path.iterdir())  # nothing was started


def test_bad_data_and_judge_exit_1_with_one_line(world, tmp_path, capsys):
    no_prompt = write_jsonl(tmp_path / "questions.jsonl", [{"question": "hi"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--dataset_name", no_prompt, "--judge", "shorter"],
         f"{no_prompt}, line 1: no 'prompt' column (columns: question)"),
        (["--dataset_name", empty, "--judge", "shorter"], f"{empty}: split 'train' has no rows"),
        (["--judge", "pair_rm", "--judge_model", world["llama"]], "not a PairRM directory"),
        (["--reward_funcs", "minidpo.judges:nothing_here"], "has no callable named 'nothing_here'"),
        (["--judge", "shorter", "--model_name_or_path", tmp_path / "missing"], "is not a model directory"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert run(base(world, out, "--max_steps", 1, *extra)) == 1
        line = one_error_line(capsys)
        assert message in line, line
        assert not (out / "model.safetensors").exists()


def test_unreadable_checkpoints_are_refused(world, tmp_path, capsys, recwarn):
    out = tmp_path / "out"
    argv = base(world, out, "--judge", "shorter", "--max_steps", 2, "--save_steps", 1)
    assert run(argv) == 0
    good = out / "checkpoint-1"
    capsys.readouterr()

    no_state = tmp_path / "no_state"
    no_state.mkdir()
    bad_json = tmp_path / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "trainer_state.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    for f in (truncated / "state").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    foreign = tmp_path / "hf_trainer"  # HF's Trainer writes a trainer_state.json of its own
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    cases = [(no_state, "is not a minidpo checkpoint (no trainer_state.json)"),
             (bad_json, "cannot read"), (truncated, "is unreadable"), (tmp_path / "nowhere", "no trainer_state.json"),
             (foreign, "was not written by minidpo")]
    for checkpoint, message in cases:
        assert run(argv + ["--resume_from_checkpoint", checkpoint]) == 1
        line = one_error_line(capsys)
        assert message in line and str(checkpoint) in line, line
    assert run(base(world, tmp_path / "fresh", "--judge", "shorter", "--max_steps", 1,
                    "--resume_from_checkpoint", "true")) == 1
    assert "no checkpoint-* in" in one_error_line(capsys)
    # The good one still resumes: step 2 again, and the same final model.
    final = load_file(out / "model.safetensors")
    assert run(argv + ["--resume_from_checkpoint", good]) == 0
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], final[name]) for name in final)
    # Nor do saving and loading print DCP's warning that one process is one process.
    assert not [str(w.message) for w in recwarn if "torch.distributed" in str(w.message)]


def nan_loss(loss):
    return loss * math.nan


def infinite_gradient(loss):
    """The loss as it is, with an infinite gradient flowing back from it."""
    loss.register_hook(lambda grad: grad * math.inf)
    return loss


@pytest.mark.parametrize("spoil, says", [(nan_loss, "the loss is nan at step 3"),
                                         (infinite_gradient, "the gradient norm is nan at step 3")])
def test_non_finite_step_stops_and_keeps_the_last_checkpoint(world, tmp_path, capsys, monkeypatch, spoil, says):
    calls, dpo_loss = [], trainer_module.dpo_loss

    def spoiled_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, pairs = dpo_loss(*args, **kwargs)
        return (spoil(loss) if len(calls) == 3 else loss), pairs

    monkeypatch.setattr(trainer_module, "dpo_loss", spoiled_at_step_3)
    out = tmp_path / "out"
    argv = base(world, out, *RULE, "--max_steps", 5, "--save_steps", 2, "--learning_rate", 1e-3)
    assert run(argv) == 1
    line = one_error_line(capsys)
    assert says in line
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    minidpo.load_model(str(checkpoint))
    monkeypatch.undo()
    resumed = Trainer(parse_args([str(a) for a in argv] + ["--resume_from_checkpoint", str(checkpoint)]))
    assert resumed.step == 2


# ---------------------------------------------------------------------------------------------
# 7. The reference's example commands (its Pythia TL;DR experiments) run as they are, with tiny
# local stand-ins for the Hub's models and dataset and --max_steps 2. 8. --help.

PYTHIA = {
    "1b": "--learning_rate 5.0e-7 --beta 0.1 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 "
          "--num_train_epochs 3 --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 "
          "--logging_steps 20 --save_steps 0.1 --push_to_hub",
    "2.8b": "--learning_rate 5.0e-7 --beta 0.1 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 "
            "--num_train_epochs 3 --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 --bf16 "
            "--logging_steps 20 --save_steps 0.1 --push_to_hub",
    "6.9b": "--learning_rate 5.0e-7 --beta 0.1 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 "
            "--num_train_epochs 3 --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 --bf16 "
            "--gradient_checkpointing --logging_steps 20 --save_steps 0.1 --push_to_hub",
}


@pytest.mark.parametrize("size", list(PYTHIA))
def test_reference_pythia_commands_run(world, tmp_path, capsys, monkeypatch, size):
    # The Hub is out of reach: point it at a closed local port so that the upload fails at once.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # read at import
    push, pushing = trainer_module.push_to_hub, []

    def timed_push(*args):
        started = time.perf_counter()
        try:
            push(*args)
        finally:
            pushing.append(time.perf_counter() - started)

    monkeypatch.setattr(trainer_module, "push_to_hub", timed_push)
    out = tmp_path / f"pythia-{size}-deduped-tldr-online-dpo"
    argv = ["--model_name_or_path", world["neox"], "--reward_model_path", world["neox_rm"],
            "--dataset_name", world["tldr"], "--output_dir", out, *PYTHIA[size].split(), "--max_steps", 2]
    assert run(argv) == 1
    last = error_lines(capsys)[-1]
    assert last.startswith("error: --push_to_hub: upload to ") and f"the model is saved in {out}" in last
    assert len(pushing) == 1 and pushing[0] < 30  # seconds, not minutes of retrying an absent Hub

    rows = metrics(out)
    assert [r["step"] for r in rows] == [2]  # --logging_steps 20: only the last step of a 2-step run
    assert rows[0]["beta"] == pytest.approx(0.1) and "objective/scores" in rows[0]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()  # --save_steps 0.1 of 2 steps: every step
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    model = minidpo.load_model(str(out))
    assert model.cfg.hf_config["architectures"] == ["GPTNeoXForCausalLM"]


def test_help_lists_the_sections():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for section in ("model & data:", "judge / reward:", "generation:", "optimisation:", "schedule:",
                    "logging & checkpoints:", "hub:"):
        assert section in result.stdout
    assert "--reward_model_path" in result.stdout and "--objective" in result.stdout
