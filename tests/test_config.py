import ast
import re
from pathlib import Path

import pytest

from minidpo import config
from minidpo.cpu import fast_bf16
from minidpo.config import DEMO_DEFAULTS, UNSUPPORTED, Config, ConfigError, interval, parse_args

DOCS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "online_dpo_trainer_docs.txt"
BASE = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]

# The example commands of the reference docs, without `accelerate launch ... examples/scripts/dpo_online.py`.
REFERENCE_COMMANDS = {
    "qwen2.5-pair_rm": """--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --judge pair_rm
        --dataset_name trl-lib/ultrafeedback-prompt --learning_rate 5.0e-7 --logging_steps 25
        --output_dir Qwen2.5-0.5B-Online-DPO-PairRM --warmup_ratio 0.1 --push_to_hub""",
    "pythia-1b": """--model_name_or_path trl-lib/pythia-1b-deduped-tldr-sft
        --reward_model_path trl-lib/pythia-1b-deduped-tldr-rm --dataset_name trl-lib/tldr
        --learning_rate 5.0e-7 --output_dir pythia-1b-deduped-tldr-online-dpo --beta 0.1
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_train_epochs 3
        --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 --logging_steps 20
        --save_steps 0.1 --push_to_hub""",
    "pythia-2.8b": """--model_name_or_path trl-lib/pythia-2.8b-deduped-tldr-sft
        --reward_model_path trl-lib/pythia-2.8b-deduped-tldr-rm --dataset_name trl-lib/tldr
        --learning_rate 5.0e-7 --output_dir pythia-2.8b-deduped-tldr-online-dpo --beta 0.1
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_train_epochs 3
        --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 --bf16 --logging_steps 20
        --save_steps 0.1 --push_to_hub""",
    "pythia-6.9b": """--model_name_or_path trl-lib/pythia-6.9b-deduped-tldr-sft
        --reward_model_path trl-lib/pythia-6.9b-deduped-tldr-rm --dataset_name trl-lib/tldr
        --learning_rate 5.0e-7 --output_dir pythia-6.9b-deduped-tldr-online-dpo --beta 0.1
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --num_train_epochs 3
        --max_new_tokens 53 --warmup_ratio 0.1 --missing_eos_penalty 1.0 --bf16 --gradient_checkpointing
        --logging_steps 20 --save_steps 0.1 --push_to_hub""",
}


def error_line(capsys, argv) -> str:
    """The one line argparse prints for a bad command line, after checking it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def reference_defaults() -> dict:
    """name -> default of every `name: type = default` in the docs' OnlineDPOConfig signature."""
    text = DOCS.read_text(encoding="utf-8")
    signature = text[text.index("class trl.OnlineDPOConfig"):]
    signature = signature[:signature.index(" )")]
    defaults = {}
    for name, value in re.findall(r"(\w+): [^:=]+? = (\S+)", signature):
        try:
            defaults[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # <factory>
            pass
    return defaults


@pytest.mark.skipif(not DOCS.exists(), reason="reference docs not beside the repository")
def test_defaults_match_the_reference_docs():
    reference = reference_defaults()
    ours = Config().to_dict()
    # report_to: the reference's None meant "every installed integration"; minidpo reports nowhere unless asked.
    compared = [name for name in ours if name in reference and name != "report_to"]
    assert len(compared) >= 30, compared  # the docs parsed, and nearly every flag has a reference default
    assert {name: ours[name] for name in compared} == {name: reference[name] for name in compared}
    assert reference["max_length"] == 256 and reference["learning_rate"] == 5e-7
    assert "defaults to0.1" in DOCS.read_text(encoding="utf-8").replace("\n", "") and Config().beta == [0.1]


def test_spot_check_defaults():
    c = Config()
    assert (c.max_new_tokens, c.max_length, c.temperature, c.loss_type) == (64, 256, 0.9, "sigmoid")
    assert (c.learning_rate, c.num_train_epochs, c.max_steps, c.lr_scheduler_type) == (5e-7, 3.0, -1, "linear")
    assert (c.logging_steps, c.save_steps, c.per_device_train_batch_size, c.seed) == (500, 500, 8, 42)
    assert c.disable_dropout and not c.bf16 and not c.use_vllm and c.report_to == ["none"]


@pytest.mark.parametrize("name", REFERENCE_COMMANDS)
def test_every_reference_command_parses(name):
    config = parse_args(REFERENCE_COMMANDS[name].split())
    assert config.push_to_hub and config.learning_rate == 5e-7 and config.warmup_ratio == 0.1
    if name.startswith("pythia"):
        assert config.reward_model_path.endswith("-rm") and config.judge is None
        assert config.save_steps == 0.1 and config.logging_steps == 20 and config.missing_eos_penalty == 1.0
        assert config.max_new_tokens == 53 and config.beta == [0.1] and config.num_train_epochs == 3
        assert config.bf16 == (name != "pythia-1b")
        assert config.gradient_checkpointing == (name == "pythia-6.9b")
    else:
        assert config.judge == "pair_rm" and config.logging_steps == 25


@pytest.mark.parametrize("argv, expected", [
    (["--bf16"], True), (["--bf16", "true"], True), (["--bf16", "True"], True), (["--bf16", "1"], True),
    (["--bf16", "false"], False), (["--bf16", "False"], False), (["--bf16", "0"], False), ([], False),
])
def test_bool_forms(argv, expected):
    assert parse_args(BASE + ["--judge", "j"] + argv).bf16 is expected


def test_bool_flags_on_by_default_can_be_turned_off(capsys):
    assert parse_args(BASE + ["--judge", "j", "--no_disable_dropout"]).disable_dropout is False
    assert parse_args(BASE + ["--judge", "j", "--cuda_graphs", "false"]).cuda_graphs is False
    assert "--bf16: expected true or false, got 'maybe'" in error_line(capsys, BASE + ["--bf16", "maybe"])


def test_beta_is_a_float_or_a_list():
    assert parse_args(BASE + ["--judge", "j", "--beta", "0.1", "0.05"]).beta == [0.1, 0.05]
    assert parse_args(BASE + ["--judge", "j", "--beta", "0.2"]).beta == [0.2]
    assert Config(beta=0.3).beta == [0.3]


def test_steps_are_counts_or_fractions_of_the_run(capsys):
    config = parse_args(BASE + ["--judge", "j", "--logging_steps", "20", "--save_steps", "0.1"])
    assert interval(config.logging_steps, 1000) == 20 and interval(config.save_steps, 1000) == 100
    assert interval(0.1, 15) == 2  # rounded up, as HF does
    assert interval(0, 100) == 0
    assert "--logging_steps must be a fraction below 1 or a whole number" in error_line(
        capsys, BASE + ["--judge", "j", "--logging_steps", "2.5"])


def test_unknown_flag_exits_2_naming_it(capsys):
    line = error_line(capsys, BASE + ["--judge", "j", "--not_a_flag", "3"])
    assert "unrecognized arguments" in line and "--not_a_flag" in line


def test_flags_are_not_abbreviated(capsys):
    assert "--bf" in error_line(capsys, BASE + ["--judge", "j", "--bf"])


@pytest.mark.parametrize("name", UNSUPPORTED)
@pytest.mark.parametrize("value", [[], ["x"]])
def test_accelerate_and_hf_only_flags_say_what_to_do(capsys, name, value):
    line = error_line(capsys, BASE + ["--judge", "j", f"--{name}"] + value)
    assert line.endswith(f"--{name}: {UNSUPPORTED[name]}")


def test_unsupported_messages_point_somewhere():
    assert "FSDP2" in UNSUPPORTED["deepspeed"] and "--nproc_per_node" in UNSUPPORTED["num_processes"]
    assert "torchrun" in UNSUPPORTED["config_file"]


@pytest.mark.parametrize("extra, message", [
    (["--judge", "j", "--reward_model_path", "r"], "either --judge or --reward_model_path"),
    (["--judge", "j", "--reward_funcs", "m:f"], "either --judge or --reward_model_path"),
    ([], "needs --judge, --reward_model_path or --reward_funcs"),
    (["--reward_funcs", "nocolon"], "--reward_funcs: 'nocolon' is not module:function"),
    (["--judge", "j", "--max_new_tokens", "256"], "--max_new_tokens (256) must be smaller than --max_length (256)"),
    (["--judge", "j", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--judge", "j", "--beta", "0"], "--beta must be > 0"),
    (["--judge", "j", "--beta", "0.1", "-1"], "--beta must be > 0"),
    (["--judge", "j", "--loss_type", "kto"], "--loss_type must be one of sigmoid, ipo, hinge, simpo"),
    (["--judge", "j", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--judge", "j", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--judge", "j", "--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    (["--judge", "j", "--temperature", "0"], "--temperature must be > 0"),
    (["--judge", "j", "--missing_eos_penalty", "-1"], "--missing_eos_penalty must be >= 0"),
    (["--judge", "j", "--max_steps", "0"], "--max_steps must be -1 or > 0"),
    (["--judge", "j", "--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    (["--judge", "j", "--lr_scheduler_type", "polynomial"],
     "--lr_scheduler_type 'polynomial' is not supported; use one of linear, constant, constant_with_warmup, cosine"),
    (["--judge", "j", "--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1]"),
    (["--judge", "j", "--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    (["--judge", "j", "--logging_steps", "0"], "--logging_steps must be > 0"),
    (["--judge", "j", "--save_steps", "-1"], "--save_steps must be a fraction below 1 or a whole number"),
    (["--judge", "j", "--logging_steps", "inf"], "--logging_steps must be finite, got inf"),
    (["--judge", "j", "--log_completions_steps", "-1"], "--log_completions_steps must be >= 0"),
    (["--judge", "j", "--report_to", "mlflow"], "--report_to 'mlflow' is not supported; use none, tensorboard, wandb"),
    (["--judge", "j", "--objective", "sft"], "--objective must be one of online_dpo, reward"),
    (["--judge", "j", "--use_vllm"], "--use_vllm: minidpo generates in-process"),
    (["--judge", "j", "--missing_eos_penalty", "1"], "--missing_eos_penalty applies to reward scores; a --judge"),
    (["--reward_funcs", "m:f", "--reward_weights", "1", "2"], "--reward_weights: 2 weights for 1 reward model"),
    (["--judge", "j", "--top_k", "-1"], "--top_k must be >= 0, got -1"),
    (["--judge", "j", "--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--judge", "j", "--min_p", "2"], "--min_p must be in [0, 1], got 2.0"),
    (["--judge", "j", "--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
    (["--judge", "j", "--generation_kwargs", '{"top_p": 1.5}'], "--top_p must be in (0, 1], got 1.5"),
    (["--judge", "j", "--generation_kwargs", '{"num_beams": 4}'],
     '--generation_kwargs must be a JSON object of temperature, top_k, top_p, min_p, repetition_penalty, '
     'min_new_tokens, stop_strings, got {"num_beams": 4}'),
    (["--judge", "j", "--generation_kwargs", '[1]'], "--generation_kwargs must be a JSON object"),
    (["--judge", "j", "--generation_kwargs", "{top_k: 4}"], "argument --generation_kwargs: invalid loads value"),
])
def test_validation_errors_name_the_flag(capsys, extra, message):
    assert message in error_line(capsys, BASE + extra)


@pytest.mark.parametrize("missing", ["--dataset_name", "--output_dir"])
def test_required_flags_outside_the_demo(capsys, missing):
    argv = BASE + ["--judge", "j"]
    i = argv.index(missing)
    del argv[i:i + 2]
    assert f"{missing} is required" in error_line(capsys, argv)


def test_validate_raises_config_error():
    with pytest.raises(ConfigError, match="--model_name_or_path is required"):
        Config().validate()
    assert issubclass(ConfigError, ValueError)


def test_reward_objective_needs_no_judge():
    assert parse_args(BASE + ["--objective", "reward"]).objective == "reward"


def test_demo_defaults_fill_only_what_was_not_given():
    demo = parse_args([])
    for name, value in DEMO_DEFAULTS.items():
        assert getattr(demo, name) == value
    assert demo.bf16 == fast_bf16()
    assert Path(demo.dataset_name).is_file()
    assert demo.beta == [0.1] and demo.temperature == 0.9  # the rest keep the reference's defaults

    shorter = parse_args(["--max_steps", "10", "--judge", "longer"])
    assert shorter.max_steps == 10 and shorter.judge == "longer"
    assert shorter.model_name_or_path == DEMO_DEFAULTS["model_name_or_path"]
    assert shorter.max_new_tokens == DEMO_DEFAULTS["max_new_tokens"]

    scored = parse_args(["--reward_model_path", "r"])  # a scorer given by the user replaces the demo's judge
    assert scored.judge is None and scored.reward_model_path == "r"


@pytest.mark.parametrize("fast", [True, False])
def test_the_demo_computes_in_bf16_where_bf16_is_fast(monkeypatch, fast):
    monkeypatch.setattr(config, "fast_bf16", lambda: fast)
    assert parse_args([]).bf16 is fast
    assert parse_args(["--bf16", "true"]).bf16 is True and parse_args(["--bf16", "false"]).bf16 is False
    assert parse_args(BASE + ["--judge", "j"]).bf16 is False  # not the demo: the reference's default


def test_no_demo_defaults_once_a_model_is_given(capsys):
    config = parse_args(BASE + ["--judge", "j"])
    assert config.max_steps == -1 and config.max_new_tokens == 64 and config.learning_rate == 5e-7
    assert "needs --judge" in error_line(capsys, BASE)


def test_help_lists_the_sections(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for section in ("model & data:", "judge / reward:", "generation:", "optimisation:", "schedule:",
                    "logging & checkpoints:", "hub:"):
        assert section in out
    assert "--max_new_tokens INT" in out and "(default: 64)" in out
    assert "--deepspeed" not in out  # the unsupported flags only answer when used


def test_to_dict_masks_the_hub_token():
    values = parse_args(BASE + ["--judge", "j", "--hub_token", "hf_secret"]).to_dict()
    assert values["hub_token"] == "<HUB_TOKEN>" and "hf_secret" not in str(values)
    assert values["judge"] == "j" and values["beta"] == [0.1]
    assert set(values) == set(Config().to_dict())
