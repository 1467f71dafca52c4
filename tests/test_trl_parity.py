"""The same job gives the same answer as TRL 1.16 (and the transformers / accelerate code it runs):
minidpo and TRL on the same tiny models and the same completions, for what the reward model reads,
what reward functions are called with, how many optimizer steps an epoch takes and where epochs
end, which parameters are weight-decayed, and how a prompt ending with an assistant turn is
rendered. Each compares against TRL's own code, run here, not against a copy of its rules."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from fakes import FixedSampler
from minidpo.checkpoint import tensor_plan
from minidpo.config import parse_args
from minidpo.data import PromptSampler
from minidpo.judges import Preference
from minidpo.tokenizer import Tokenizer
from minidpo.trainer import Trainer
from tokenizer_world import LLAMA2_TEMPLATE, chatml_config, write_dir
from tiny_world import words, write_jsonl
from tiny_world import MODEL, save_model

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_world")
    torch.manual_seed(0)
    return {
        "llama": save_model(root / "llama", T.LlamaForCausalLM(T.LlamaConfig(**MODEL, num_key_value_heads=2))),
        "qwen2": save_model(root / "qwen2", T.Qwen2ForCausalLM(T.Qwen2Config(**MODEL, num_key_value_heads=2))),
        "neox": save_model(root / "neox", T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**MODEL, rotary_pct=0.25))),
        "rm": save_model(root / "rm", T.LlamaForSequenceClassification(
            T.LlamaConfig(**MODEL, num_key_value_heads=2, num_labels=1))),
        # The same reward model's shape with room for 24 positions only.
        "rm24": save_model(root / "rm24", T.LlamaForSequenceClassification(
            T.LlamaConfig(**(MODEL | {"max_position_embeddings": 24}), num_key_value_heads=2, num_labels=1))),
    }


def flags(world, out, *extra) -> list[str]:
    return [str(a) for a in ["--model_name_or_path", world["llama"], "--dataset_name", "unread.jsonl",
                             "--output_dir", out, "--max_new_tokens", 4, "--max_length", 16, "--save_steps", 0,
                             *extra]]


# ---------------------------------------------------------------------------------------------
# The reward model reads the whole prompt + completion, as TRL's reward function does.

def trl_rewards(reward_funcs, prompts, completions, completion_ids=None, weights=None, **columns) -> torch.Tensor:
    """TRL's OnlineDPOTrainer._calculate_rewards_from_functions on these rows, with only the trainer
    attributes it reads."""
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu"), reward_funcs=reward_funcs, state=None,
        reward_processing_classes=[T.AutoTokenizer.from_pretrained(f.name_or_path) if isinstance(f, torch.nn.Module)
                                   else None for f in reward_funcs],
        reward_weights=torch.tensor(weights or [1.0] * len(reward_funcs)))
    return OnlineDPOTrainer._calculate_rewards_from_functions(trainer, prompts, completions, completion_ids, **columns)


CONVERSATION = [{"role": "user", "content": words(1, 30)}]
LONG_ROWS = [{"prompt": CONVERSATION}, {"prompt": words(2, 30)}]  # ~35 tokens each, over --max_length 16


def hf_rm(path):
    return T.AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)


def test_reward_model_scores_the_whole_text_not_max_length(world, tmp_path):
    preference = Preference(parse_args(flags(world, tmp_path, "--reward_model_path", world["rm"])), "cpu")
    completions, has_eos = [" " + words(i, 4) for i in range(3, 7)], torch.ones(4, dtype=torch.bool)
    ours = preference(LONG_ROWS, completions, has_eos)[3]
    # TRL takes one kind of prompt per batch: the conversational rows, then the standard ones.
    prompts = [row["prompt"] for row in LONG_ROWS for _ in range(2)]
    messages = [[{"role": "assistant", "content": c}] for c in completions[:2]]
    theirs = torch.cat([trl_rewards([hf_rm(world["rm"])], prompts[:2], messages),
                        trl_rewards([hf_rm(world["rm"])], prompts[2:], completions[2:])])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # What minidpo read before, the last --max_length tokens, scores otherwise: the test can fail.
    preference.scorers[0].max_length = 16
    assert (preference(LONG_ROWS, completions, has_eos)[3] - ours).abs().min() > 1e-3


def test_reward_model_cuts_at_its_position_limit_with_one_warning(world, tmp_path, capsys):
    cfg = parse_args(flags(world, tmp_path, "--reward_model_path", world["rm24"]))
    preference = Preference(cfg, "cpu")
    rows, completions = LONG_ROWS[1:], [" " + words(3, 4), " " + words(4, 4)]
    ours = preference(rows, completions, torch.ones(2, dtype=torch.bool))[3]
    preference(rows, completions, torch.ones(2, dtype=torch.bool))
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "reads at most 24 tokens" in warnings[0]
    hf_tok, model = T.AutoTokenizer.from_pretrained(world["rm24"]), hf_rm(world["rm24"])
    for score, completion in zip(ours, completions):
        ids = hf_tok(rows[0]["prompt"] + completion, add_special_tokens=False)["input_ids"]
        assert len(ids) > 24
        assert score.item() == pytest.approx(model(torch.tensor([ids[-24:]])).logits[0, 0].item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Reward functions get TRL's arguments: types, keyword arguments, every other dataset column.

CHAT_ROWS = [{"prompt": [{"role": "user", "content": words(i, 3)}], "id": i, "tags": ["t", str(i)]}
             for i in range(4)]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        state = kwargs["trainer_state"]  # TRL's is live: what it says now, not after the step
        self.calls.append((prompts, completions, kwargs | {"trainer_state": SimpleNamespace(
            global_step=state.global_step, max_steps=state.max_steps, epoch=state.epoch)}))
        return [float(len(c[0]["content"])) for c in completions]


def per_completion(call, tokenizer) -> list:
    """(prompt, id, tags, whether the ids decode to the text) per completion, sorted: TRL's layout
    (all first samples, then all second ones) and minidpo's (prompt-major) compare."""
    prompts, completions, kwargs = call
    return sorted((json.dumps(p), kwargs["id"][i], kwargs["tags"][i],
                   tokenizer.decode(kwargs["completion_ids"][i], skip_special_tokens=True) == completions[i][0]["content"])
                  for i, p in enumerate(prompts))


def trl_trainer(world, tmp_path, rows, reward_funcs, **args) -> OnlineDPOTrainer:
    from datasets import Dataset

    args = OnlineDPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", save_strategy="no", use_cpu=True,
                           logging_steps=1, max_new_tokens=4, **args)
    return OnlineDPOTrainer(model=T.AutoModelForCausalLM.from_pretrained(world["llama"]), reward_funcs=reward_funcs,
                            args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=T.AutoTokenizer.from_pretrained(world["llama"]))


def test_reward_functions_get_trls_arguments_on_conversational_data(world, tmp_path):
    trl_record = Recorder()
    trl_trainer(world, tmp_path, CHAT_ROWS, [trl_record], per_device_train_batch_size=4, max_steps=1).train()

    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    trainer = Trainer(parse_args(flags(world, tmp_path / "ours", "--dataset_name", data, "--reward_funcs",
                                       "minidpo.judges:brevity", "--per_device_train_batch_size", 4, "--max_steps", 1)))
    ours = Recorder()
    trainer.preference.rewards.funcs = [ours]
    trainer.train_step([next(trainer.micro_batches())])

    (theirs_call,), (ours_call,) = trl_record.calls, ours.calls
    assert set(ours_call[2]) == set(theirs_call[2]) == {"completion_ids", "trainer_state", "id", "tags"}
    for prompts, completions, kwargs in (theirs_call, ours_call):
        assert len(prompts) == len(completions) == 8 and all(isinstance(p, list) for p in prompts)
        assert all(isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant"
                   and isinstance(c[0]["content"], str) for c in completions)
        assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in kwargs["completion_ids"])
        state = kwargs["trainer_state"]
        assert (state.global_step, state.max_steps, state.epoch) == (0, 1, 0)
    # Each completion with its own row's columns, and its ids decoding to its text, on both sides.
    tokenizer = T.AutoTokenizer.from_pretrained(world["llama"])
    theirs_rows, ours_rows = per_completion(theirs_call, tokenizer), per_completion(ours_call, tokenizer)
    assert ours_rows == theirs_rows and all(r[3] for r in ours_rows)


REWARDS = """
def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def opinionated(prompts, completions, **kwargs):
    return [None if "a" in c else 1.0 for c in completions]  # None: no opinion, left out of the sum
"""


def test_reward_weights_as_trls(world, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    funcs = [f"{tmp_path / 'rewards.py'}:{name}" for name in ("length", "opinionated")]
    preference = Preference(parse_args(flags(world, tmp_path, "--reward_model_path", world["rm"], "--reward_funcs",
                                             *funcs, "--reward_weights", 0.5, 2, -1)), "cpu")
    rows, completions = [{"prompt": words(2, 5)}, {"prompt": words(3, 4)}], [" a b", " cat", " dog", " a"]
    ours = preference(rows, completions, torch.ones(4, dtype=torch.bool))[3]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    theirs = trl_rewards([hf_rm(world["rm"]), *preference.scorers[1:]], prompts, completions, weights=[0.5, 2, -1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.tolist() != pytest.approx(trl_rewards([hf_rm(world["rm"]), *preference.scorers[1:]], prompts,
                                                      completions).tolist())  # the weights matter


# ---------------------------------------------------------------------------------------------
# Steps per epoch and epoch boundaries: 100 prompts, batch 8, accumulation 4, 3 epochs.

def test_steps_and_epoch_boundaries_match_trl(world, tmp_path):
    rows = [{"prompt": words(i, 3)} for i in range(100)]
    # TRL's loop (HF's Trainer) with the work of a step stubbed out: which epoch each micro-batch
    # is in, its size, and the epoch HF logs after each optimizer step.
    theirs, epochs_logged, epoch = [], [], [-1]

    class Watch(T.TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            epoch[0] += 1

        def on_step_end(self, args, state, control, **kwargs):
            epochs_logged.append(state.epoch)
            theirs.append([])

    reference = trl_trainer(world, tmp_path, rows, [Recorder()], per_device_train_batch_size=8,
                            gradient_accumulation_steps=4, num_train_epochs=3)
    reference.add_callback(Watch())
    theirs.append([])

    def training_step(model, inputs, num_items_in_batch=None):
        theirs[-1].append((epoch[0], len(inputs["prompt"])))
        return torch.tensor(0.0)

    reference.training_step, reference.stats = training_step, {}  # no step, so no metrics to log
    reference.train()
    theirs.pop()  # the list opened after the last step
    assert reference.state.max_steps == 12 and len(theirs) == 12  # HF's count, not 100 // 8 // 4 * 3 = 9

    data = write_jsonl(tmp_path / "p.jsonl", rows)
    trainer = Trainer(parse_args(flags(world, tmp_path / "ours", "--dataset_name", data, "--judge", "shorter",
                                       "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 4,
                                       "--num_train_epochs", 3, "--logging_steps", 1)))
    ours = []

    def train_step(micro_batches):
        ours.append([(e, len(batch)) for e, batch in micro_batches])
        return {"loss": (torch.tensor(0.0), torch.tensor(1.0))}, torch.tensor(0.0)

    trainer.train_step = train_step
    trainer.train()
    assert trainer.total_steps == 12 and ours == theirs
    assert ours[3] == [(0, 4)]  # the epoch's short last step: 13 batches, the last of 4 prompts
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(epochs_logged, abs=1e-9)


@pytest.mark.parametrize("items, batch, ranks", [(100, 8, 2), (21, 4, 2), (100, 8, 3), (3, 4, 2), (64, 8, 4)])
def test_ranks_get_the_batches_accelerate_deals(items, batch, ranks):
    """Under torchrun HF's Trainer shards the batches with accelerate's BatchSamplerShard
    (even_batches): minidpo's ranks get exactly those batches of the same epoch order."""
    from accelerate.data_loader import BatchSamplerShard

    order = sum(PromptSampler(list(range(items)), batch, seed=5).batches(epoch=1), [])  # one process: the order
    for rank in range(ranks):
        theirs = BatchSamplerShard(torch.utils.data.BatchSampler(order, batch, drop_last=False), ranks, rank)
        ours = PromptSampler(list(range(items)), batch, rank=rank, world_size=ranks, seed=5)
        assert list(ours.batches(epoch=1)) == list(theirs) and ours.batches_per_epoch == len(theirs)


# ---------------------------------------------------------------------------------------------
# Weight decay: HF's Trainer exempts biases and norm weights.

@pytest.mark.parametrize("family", ["llama", "qwen2", "neox"])
def test_weight_decay_groups_match_hf(world, tmp_path, family):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    trainer = Trainer(parse_args(flags(world, tmp_path, "--model_name_or_path", world[family], "--dataset_name",
                                       data, "--judge", "shorter", "--weight_decay", 0.1)))
    names = {id(p): n for n, p in trainer.policy.named_parameters()}
    plan = tensor_plan(trainer.policy.cfg.hf_config, trainer.policy.cfg)
    renamed = {"embed_out.weight": "lm_head.weight"}  # GPT-NeoX's checkpoint name; transformers 5 renames it
    decayed = {g["weight_decay"]: {renamed.get(hf, hf) for p in g["params"] for hf in plan[names[id(p)]]}
               for g in trainer.optimizer.param_groups}
    hf_model = T.AutoModelForCausalLM.from_pretrained(world[family])
    hf_decayed = set(T.Trainer.get_decay_parameter_names(None, hf_model))
    assert decayed[0.1] == hf_decayed and decayed[0.0] == {n for n, _ in hf_model.named_parameters()} - hf_decayed
    assert any(n.endswith("bias") for n in decayed[0.0]) == (family != "llama")  # qkv bias (Qwen2), NeoX biases


# ---------------------------------------------------------------------------------------------
# A conversational prompt that ends with an assistant turn is continued, as TRL renders it.

CONTINUED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "My answer: "}]
CONTINUED_LLAMA = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "It is  "}]


@pytest.mark.parametrize("template, prompt", [(None, CONTINUED), (LLAMA2_TEMPLATE, CONTINUED_LLAMA)])
def test_prompt_ending_with_an_assistant_turn_is_continued(backend, tmp_path, template, prompt):  # noqa: F811
    from trl.data_utils import maybe_apply_chat_template

    config = chatml_config() if template is None else chatml_config(template) | {"bos_token": "<|endoftext|>"}
    path = write_dir(tmp_path, backend, config)
    ours, hf = Tokenizer.from_dir(path), T.AutoTokenizer.from_pretrained(path)
    text = ours.render(prompt)
    assert text == maybe_apply_chat_template({"prompt": prompt}, hf)["prompt"]
    assert text == hf.apply_chat_template(prompt, continue_final_message=True, tokenize=False)
    assert text.rstrip().endswith(prompt[-1]["content"].strip())  # the turn is left open
    # Scored, the completion is the rest of that assistant turn.
    merged = prompt[:-1] + [{"role": "assistant", "content": prompt[-1]["content"] + "blue"}]
    assert ours.render(prompt, "blue") == hf.apply_chat_template(merged, tokenize=False)


# ---------------------------------------------------------------------------------------------
# TRL's sampling flags: the same names and defaults, and they reach the sampler.

def test_sampling_flags_as_trls_reach_the_sampler(world, tmp_path):
    trl_defaults = OnlineDPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True)
    ours = parse_args(flags(world, tmp_path, "--judge", "shorter"))
    for name in ("top_k", "top_p", "repetition_penalty", "generation_kwargs"):
        assert getattr(ours, name) == getattr(trl_defaults, name), name
    assert trl_defaults.min_p is None and ours.min_p == 0.0  # both off

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": words(i, 3)} for i in range(2)])
    trainer = Trainer(parse_args(flags(world, tmp_path / "ours", "--dataset_name", data, "--judge", "shorter",
                                       "--per_device_train_batch_size", 2, "--top_k", 7, "--top_p", 0.9,
                                       "--min_p", 0.05, "--repetition_penalty", 1.2, "--generation_kwargs",
                                       '{"top_p": 0.8, "stop_strings": "day", "min_new_tokens": 2}')))
    calls, fixed = [], FixedSampler(4, trainer.tokenizer.vocab_size)
    trainer.sampler.generate = lambda *args, **kwargs: calls.append(kwargs) or fixed.generate(*args, **kwargs)
    trainer.train_step([next(trainer.micro_batches())])
    # --generation_kwargs wins over the flags, as in TRL; one stop string is a list of one.
    assert {k: calls[0][k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                     "stop_strings", "min_new_tokens")} == dict(
        temperature=0.9, top_k=7, top_p=0.8, min_p=0.05, repetition_penalty=1.2, stop_strings=["day"],
        min_new_tokens=2)
    assert calls[0]["decode"] == trainer.tokenizer.decode
