"""LoRA (minidpo.lora) against PEFT, the independent reference, on tiny transformers models of each
family: adapters saved by either load in the other with equal logits, one step's gradients are
equal, merging equals PEFT's merge; and in the trainer: the reference is the base model (KL 0
before the first step), only the adapters train, the output loads in PEFT."""

import io
import json
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.distributed.checkpoint
import transformers as T
from safetensors.torch import load_file

import train
from minidpo import chat

import minidpo
from minidpo import lora
from minidpo.config import parse_args
from minidpo.sampler import Sampler
from minidpo.trainer import Trainer
from tiny_world import WORDS, crash_before_step, save_tokenizer, tiny_llama, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import winrate  # noqa: E402
from minidpo.lora import LoraSpec, adapters_disabled, add_adapters, load_adapter, merge_adapters, write_adapter

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
# Targets that adapt the fused layers in part: q and v of q/k/v, up of gate/up (Llama), k and gate
# (Qwen2). GPT-NeoX's query_key_value is one module in HF too, but its rows interleave the heads.
FAMILIES = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True)),
              ["q_proj", "v_proj", "up_proj"]),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2)),
              ["k_proj", "gate_proj", "o_proj"]),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, rotary_pct=0.25)),
                 ["query_key_value", "dense_h_to_4h"]),
}
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
TOL = dict(rtol=1e-4, atol=1e-4)


def base_model(tmp_path, family):
    """A randomly initialised transformers model saved in tmp_path/base, and its path."""
    torch.manual_seed(0)
    hf = FAMILIES[family][0]().eval()
    hf.save_pretrained(tmp_path / "base")
    return hf, tmp_path / "base"


def peft_model(hf, targets, rslora=False):
    """PEFT's LoRA with random A and B (init_lora_weights=False), so the adapters change the logits."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora,
                             init_lora_weights=False)
    return peft.get_peft_model(hf, config).eval()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_adapter_loads_with_equal_logits_and_gradients(tmp_path, family, rslora):
    hf, base_dir = base_model(tmp_path, family)
    theirs = peft_model(hf, FAMILIES[family][1], rslora)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(minidpo.load_model(str(base_dir)), tmp_path / "adapter")

    their_logits, our_logits = theirs(IDS).logits, ours(IDS)
    torch.testing.assert_close(our_logits, their_logits, **TOL)
    with theirs.disable_adapter(), adapters_disabled(ours), torch.no_grad():
        base_logits = theirs(IDS).logits
        torch.testing.assert_close(ours(IDS), base_logits, **TOL)
    assert (their_logits - base_logits).abs().max() > 0.01  # the adapters matter: the test can fail

    # One loss, log p of the next tokens, backpropagated through both: the adapters' gradients agree.
    def loss(logits):
        return logits[:, :-1].log_softmax(-1).gather(-1, IDS[:, 1:, None]).sum()

    loss(their_logits).backward()
    loss(our_logits).backward()
    our_grads = lora.peft_tensors({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, ours)
    their_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * 2 * len(FAMILIES[family][1])
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, **TOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)  # the base is frozen


def our_adapter(base_dir, targets, seed=2):
    """minidpo's LoRA on the base model with B set at random (fresh adapters are exact no-ops)."""
    model = add_adapters(minidpo.load_model(str(base_dir)), LoraSpec(r=4, alpha=8, target_modules=targets,
                                                                     base_model=str(base_dir)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, family):
    hf, base_dir = base_model(tmp_path, family)
    ours = our_adapter(base_dir, FAMILIES[family][1])
    (tmp_path / "adapter").mkdir()
    write_adapter(ours.state_dict(), ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, **TOL)
        with adapters_disabled(ours):
            base_logits = ours(IDS)
        assert (ours(IDS) - base_logits).abs().max() > 0.01


def test_default_and_all_linear_targets_are_peft_s(tmp_path):
    hf, base_dir = base_model(tmp_path, "qwen2")
    for targets in (None, "all-linear"):
        ours = add_adapters(minidpo.load_model(str(base_dir)), LoraSpec(target_modules=targets))
        theirs = peft.get_peft_model(FAMILIES["qwen2"][0](), peft.LoraConfig(target_modules=targets))
        our_names = set(lora.peft_tensors(ours.state_dict(), ours))
        assert our_names == {n.replace(".default", "") for n, _ in theirs.named_parameters() if "lora_" in n}


def test_fresh_adapters_change_nothing_and_the_base_stays_frozen(tmp_path):
    _, base_dir = base_model(tmp_path, "llama")
    plain = minidpo.load_model(str(base_dir))
    model = add_adapters(minidpo.load_model(str(base_dir)), LoraSpec(target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(IDS), plain(IDS))  # B = 0: exactly the base, so the KL starts at exactly 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.state_dict().keys() >= plain.state_dict().keys()  # the base weights keep their names


def test_bad_targets_and_adapters_are_refused(tmp_path):
    _, base_dir = base_model(tmp_path, "llama")
    with pytest.raises(ValueError, match="match no linear layer"):
        add_adapters(minidpo.load_model(str(base_dir)), LoraSpec(target_modules=["query_key_value"]))
    ours = our_adapter(base_dir, ["q_proj"])
    (tmp_path / "adapter").mkdir()
    write_adapter(ours.state_dict(), ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA"):
        load_adapter(minidpo.load_model(str(base_dir)), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["v_proj"]}))
    with pytest.raises(ValueError, match="q_proj.lora_A.weight is unexpected"):
        load_adapter(minidpo.load_model(str(base_dir)), tmp_path / "adapter")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_merge_command_writes_the_merged_model(tmp_path, family):
    hf, base_dir = base_model(tmp_path, family)
    ours = our_adapter(base_dir, FAMILIES[family][1])
    (tmp_path / "adapter").mkdir()
    write_adapter(ours.state_dict(), ours, tmp_path / "adapter")
    save_tokenizer(base_dir)
    assert lora.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0

    merged_by_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().eval()
    merged_by_us = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model = merge_adapters(load_adapter(minidpo.load_model(str(base_dir)), tmp_path / "adapter"))
    assert not lora.lora_layers(model) and not hasattr(model, "lora")
    with torch.no_grad():
        expected = merged_by_peft(IDS).logits
        torch.testing.assert_close(merged_by_us(IDS).logits, expected, **TOL)
        torch.testing.assert_close(model(IDS), expected, **TOL)


# ---------------------------------------------------------------------------------------------
# In the trainer: --use_peft.


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    rows = [{"prompt": " ".join(WORDS[(i * 7 + j * 3) % 60] for j in range(4))} for i in range(16)]
    return tiny_llama(root), write_jsonl(root / "prompts.jsonl", rows)


def lora_argv(world, out, *extra):
    return [str(a) for a in ["--model_name_or_path", world[0], "--dataset_name", world[1], "--output_dir", out,
                             "--max_new_tokens", 8, "--max_length", 64, "--logging_steps", 1, "--save_steps", 0,
                             "--reward_funcs", "minidpo.judges:brevity", "--per_device_train_batch_size", 4,
                             "--learning_rate", 1e-2, "--use_peft", "--lora_r", 4, *extra]]


def test_trainer_trains_only_the_adapters_against_the_base(world, tmp_path):
    out = tmp_path / "out"
    t = Trainer(parse_args(lora_argv(world, out, "--max_steps", 3, "--lora_target_modules", "q_proj", "up_proj")))
    assert t.reference is None
    optimized = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    names = [n for n, p in t.policy.named_parameters() if id(p) in optimized]
    assert len(names) == 2 * 2 * 2 and all(".lora_" in n for n in names)  # 2 layers x (q, up) x (A, B)
    t.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0  # the reference is the base

    base = minidpo.load_model(str(world[0]))
    state = t.policy.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in base.state_dict().items())  # base bytes kept
    with adapters_disabled(t.policy), torch.no_grad():
        torch.testing.assert_close(t.policy(IDS % 70), base(IDS % 70), rtol=0, atol=0)

    # The output is a PEFT adapter (no full model) that PEFT loads on the transformers base.
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert not (out / "model.safetensors").exists()
    theirs = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(world[0]), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(t.policy(IDS % 70), theirs(IDS % 70).logits, **TOL)


def test_resume_with_lora_gives_the_straight_run_and_keeps_no_base_weights(world, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = ["--max_steps", 4, "--save_steps", 2]
    assert train.main(lora_argv(world, straight, *argv)) == 0
    crash_before_step(monkeypatch, 3)
    assert train.main(lora_argv(world, resumed, *argv)) == 1
    monkeypatch.undo()
    checkpoint = resumed / "checkpoint-2"
    saved = torch.distributed.checkpoint.FileSystemReader(checkpoint / "state").read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # only what resuming needs
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert train.main(lora_argv(world, resumed, *argv, "--resume_from_checkpoint", checkpoint)) == 0
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (resumed, straight))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("flag, says", [("--use_dora", "DoRA is not supported"),
                                        ("--load_in_8bit", "quantised training"),
                                        ("--load_in_4bit", "quantised training")])
def test_unsupported_lora_flags_exit_with_one_line(world, tmp_path, capsys, flag, says):
    with pytest.raises(SystemExit) as exit:
        train.main(lora_argv(world, tmp_path, flag))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and says in err[0]


def test_chat_and_winrate_take_an_adapter_directory(world, tmp_path, monkeypatch, capfd):
    ours = our_adapter(world[0], ["q_proj", "v_proj"])
    (tmp_path / "adapter").mkdir()
    write_adapter(ours.state_dict(), ours, tmp_path / "adapter")
    assert lora.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0

    def greedy_reply(model_dir):
        model, tokenizer = lora.load_pretrained_or_adapter(str(model_dir))
        return chat.Chat(model.eval(), tokenizer, temperature=0, max_new_tokens=6).reply("hello world", io.StringIO())

    assert greedy_reply(tmp_path / "adapter") == greedy_reply(tmp_path / "merged") != greedy_reply(world[0])
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n"))
    assert chat.main(["--model_name_or_path", str(tmp_path / "adapter"), "--device", "cpu"]) == 0
    # Greedy answers of the adapter and of its merged model: every pair a tie.
    assert winrate.main(["--model_name_or_path", str(tmp_path / "adapter"), "--baseline_model",
                         str(tmp_path / "merged"), "--prompts", str(world[1]), "--max_new_tokens", "6",
                         "--device", "cpu", "--judge", "shorter"]) == 0
    assert "n=0, ties=16" in capfd.readouterr().out


def test_a_merged_rollout_generates_as_the_adapters_and_restores_the_base_bytes(tmp_path):
    _, base_dir = base_model(tmp_path, "llama")
    model = our_adapter(base_dir, ["q_proj", "v_proj", "up_proj", "down_proj"])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids, mask = IDS[:, :5], torch.ones_like(IDS[:, :5])
    sampler = Sampler(model, cuda_graphs=False)
    with torch.no_grad():
        expected = model(IDS)
        with lora.adapters_merged(model):
            torch.testing.assert_close(model(IDS), expected, **TOL)
            merged = sampler.generate(ids, mask, max_new_tokens=6, temperature=0)
        per_step = sampler.generate(ids, mask, max_new_tokens=6, temperature=0)
        with adapters_disabled(model):
            base = sampler.generate(ids, mask, max_new_tokens=6, temperature=0)
    assert torch.equal(merged.ids, per_step.ids) and not torch.equal(merged.ids, base.ids)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # exactly restored
