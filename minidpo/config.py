"""Every flag of `train.py`: one dataclass, one argparse parser.

Flag names and defaults are those of TRL's `OnlineDPOConfig` and the `TrainingArguments` fields its
example commands use, so the reference's commands run with `torchrun train.py` in place of
`accelerate launch examples/scripts/dpo_online.py`. A few flags are minidpo's own (marked below)."""

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .cpu import fast_bf16

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb")
OBJECTIVES = ("online_dpo", "reward")
GENERATION_KWARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "min_new_tokens", "stop_strings")

TORCH_DTYPES = ("auto", "bfloat16", "float32")
SECTIONS = MODEL, JUDGE, GENERATION, OPTIM, LORA, SCHEDULE, LOGGING, HUB = (  # of --help, in this order
    "model & data", "judge / reward", "generation", "optimisation", "lora", "schedule", "logging & checkpoints", "hub")


def flag(section: str, default, help: str):
    """A dataclass field that carries its --help line and the --help section it is listed under."""
    metadata = {"section": section, "help": help}
    if isinstance(default, list):  # a mutable default needs a factory, or every Config would share it
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    model_name_or_path: str | None = flag(MODEL, None, "policy to train: local HF directory, Hub repo id or "
                                          "offline:SmolLM2-135M-Instruct; leave out for the offline demo")
    dataset_name: str | None = flag(MODEL, None, "prompts: .jsonl/.json/.parquet file, dataset dir or Hub repo id")
    dataset_config: str | None = flag(MODEL, None, "dataset configuration (subdirectory) to read")
    dataset_train_split: str = flag(MODEL, "train", "split to train on")
    dataset_num_proc: int | None = flag(MODEL, None, "accepted, no effect: prompts are read in one pass")
    output_dir: str | None = flag(MODEL, None, "where checkpoints and logs go (required, as in HF)")
    objective: str = flag(MODEL, "online_dpo", f"minidpo: what to train, one of {', '.join(OBJECTIVES)} "
                          "(reward: a Bradley-Terry reward model on a preference dataset)")
    disable_dropout: bool = flag(MODEL, True, "accepted for compatibility; no effect: minidpo's models have no dropout")

    # judge / reward: a judge compares the two completions; a reward model or functions score each one
    judge: str | None = flag(JUDGE, None, "name of the pairwise judge (exclusive with --reward_model_path)")
    judge_model: str | None = flag(JUDGE, None, "minidpo: model that the llm or pair_rm judge runs "
                                   "(pair_rm: default llm-blender/PairRM)")
    judge_instruction: str | None = flag(JUDGE, None, "minidpo: instruction given to the llm judge")
    reward_model_path: str | None = flag(JUDGE, None, "reward model (local directory or Hub repo id)")
    reward_funcs: list[str] | None = flag(JUDGE, None, "minidpo: reward functions as module:function, "
                                          "added to the reward model's score if both are given")
    reward_weights: list[float] | None = flag(JUDGE, None, "weight of each score: the reward model's, then each "
                                              "reward function's (default: all 1)")
    missing_eos_penalty: float | None = flag(JUDGE, None, "subtracted from the score of a completion without EOS")

    max_new_tokens: int = flag(GENERATION, 64, "tokens generated per completion at most")
    # The reference docs' default. TRL 1.16 raised it to 512; we keep the documented behaviour.
    max_length: int = flag(GENERATION, 256, "prompt + completion tokens scored; longer ones lose their left end")
    temperature: float = flag(GENERATION, 0.9, "sampling temperature")
    top_k: int = flag(GENERATION, 0, "sample from the k likeliest tokens only; 0: off")
    top_p: float = flag(GENERATION, 1.0, "sample from the likeliest tokens holding this much probability; 1: off")
    min_p: float = flag(GENERATION, 0.0, "drop tokens less likely than min_p x the likeliest one's probability; 0: off")
    repetition_penalty: float = flag(GENERATION, 1.0, "divide (multiply if negative) the logits of tokens in the "
                                     "prompt or the completion so far by this; 1: off")
    generation_kwargs: dict | None = flag(GENERATION, None, "JSON object of sampler options overriding the flags "
                                          f"above: {', '.join(GENERATION_KWARGS)}")
    cuda_graphs: bool = flag(GENERATION, True, "minidpo: replay decode steps as CUDA graphs (GPU only)")
    use_vllm: bool = flag(GENERATION, False, "not supported: minidpo generates in-process")

    beta: list[float] = flag(OPTIM, [0.1], "KL weight (IPO's tau); a list gives one per epoch, the last one kept")
    loss_type: str = flag(OPTIM, "sigmoid", f"one of {', '.join(LOSS_TYPES)} (the README's table of losses)")
    label_smoothing: float = flag(OPTIM, 0.0, "sigmoid/simpo: probability that a label is flipped "
                                  "(conservative DPO), in [0, 0.5)")
    simpo_gamma: float = flag(OPTIM, 0.5, "simpo: target reward margin gamma")
    rpo_alpha: float | None = flag(OPTIM, None, "add alpha x the chosen completion's per-token NLL to the loss")
    num_generations: int = flag(OPTIM, 2, "minidpo: completions per prompt; the best and the worst by score "
                                "form the pair (a pairwise judge needs 2)")
    learning_rate: float = flag(OPTIM, 5e-7, "AdamW learning rate")
    weight_decay: float = flag(OPTIM, 0.0, "AdamW weight decay")
    adam_beta1: float = flag(OPTIM, 0.9, "AdamW beta1")
    adam_beta2: float = flag(OPTIM, 0.999, "AdamW beta2")
    adam_epsilon: float = flag(OPTIM, 1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(OPTIM, 1.0, "clip the gradient norm to this (0: no clipping)")
    per_device_train_batch_size: int = flag(OPTIM, 8, "prompts per process per micro-step")
    gradient_accumulation_steps: int = flag(OPTIM, 1, "micro-steps per optimizer step")
    bf16: bool = flag(OPTIM, False, "compute in bfloat16")
    gradient_checkpointing: bool = flag(OPTIM, False, "recompute activations in backward to save memory")
    seed: int = flag(OPTIM, 42, "seed for shuffling, sampling and initialisation")

    # TRL's ModelConfig: LoRA adapters (lora.py); the reference is then the policy with its adapters off
    use_peft: bool = flag(LORA, False, "train LoRA adapters on the frozen model instead of all its weights")
    lora_r: int = flag(LORA, 16, "LoRA rank")
    lora_alpha: float = flag(LORA, 32, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = flag(LORA, 0.05, "dropout on the adapters' input (off under --disable_dropout, as in TRL)")
    lora_target_modules: list[str] | None = flag(LORA, None, "modules to adapt (e.g. q_proj v_proj, or all-linear); "
                                                 "default: PEFT's for the architecture")
    use_rslora: bool = flag(LORA, False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    torch_dtype: str = flag(LORA, "float32", f"the weights' dtype: {', '.join(TORCH_DTYPES)} (auto: config.json's)")

    num_train_epochs: float = flag(SCHEDULE, 3.0, "passes over the prompts (ignored if --max_steps > 0)")
    max_steps: int = flag(SCHEDULE, -1, "optimizer steps to run; -1: from --num_train_epochs")
    lr_scheduler_type: str = flag(SCHEDULE, "linear", f"one of {', '.join(SCHEDULERS)}")
    warmup_ratio: float = flag(SCHEDULE, 0.0, "fraction of the steps spent warming up")
    warmup_steps: int = flag(SCHEDULE, 0, "warm-up steps (overrides --warmup_ratio)")

    logging_steps: float = flag(LOGGING, 500, "log every N steps (or a fraction of the run if < 1)")
    logging_first_step: bool = flag(LOGGING, False, "also log the first step")
    log_completions_steps: int = flag(LOGGING, 0, "minidpo: every N steps, log sample completions (JSONL); 0: off")
    # HF would use --save_strategy no; minidpo has no strategy flags, so 0 turns saving off.
    save_steps: float = flag(LOGGING, 500, "checkpoint every N steps (or a fraction of the run if < 1); 0: off")
    save_total_limit: int | None = flag(LOGGING, None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = flag(LOGGING, None, "checkpoint directory to resume from")
    # The reference's default (None) meant "every installed integration"; minidpo logs only where asked.
    report_to: list[str] = flag(LOGGING, ["none"], f"where metrics go besides stdout/JSONL: {', '.join(REPORT_TO)}")
    run_name: str | None = flag(LOGGING, None, "run name for TensorBoard / W&B (default: output_dir)")

    push_to_hub: bool = flag(HUB, False, "upload the model to the Hugging Face Hub when saving")
    hub_model_id: str | None = flag(HUB, None, "repo to push to (default: output_dir's name)")
    hub_token: str | None = flag(HUB, None, "token for the Hub (default: the logged-in one)")

    def __post_init__(self):
        if isinstance(self.beta, (int, float)):  # Config(beta=0.1) means the same as beta=[0.1]
            self.beta = [float(self.beta)]

    def validate(self) -> "Config":
        """Raise ConfigError with a one-line message naming the flag on the first bad value."""
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        for f in dataclasses.fields(self):  # inf and nan pass every comparison below that they should fail
            for value in getattr(self, f.name) if isinstance(getattr(self, f.name), list) else [getattr(self, f.name)]:
                need(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be finite, got {value}")
        for name in ("model_name_or_path", "dataset_name", "output_dir"):  # HF requires output_dir too
            need(getattr(self, name) is not None, f"--{name} is required")
        for name, choices in (("objective", OBJECTIVES), ("loss_type", LOSS_TYPES), ("torch_dtype", TORCH_DTYPES)):
            value = getattr(self, name)
            need(value in choices, f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.objective == "online_dpo":
            rewards = self.reward_model_path is not None or bool(self.reward_funcs)
            need(not (self.judge and rewards), "give either --judge or --reward_model_path/--reward_funcs, not both")
            need(bool(self.judge) or rewards, "online DPO needs --judge, --reward_model_path or --reward_funcs")
        for func in self.reward_funcs or []:
            need(":" in func, f"--reward_funcs: {func!r} is not module:function")
        need(not self.use_vllm, "--use_vllm: minidpo generates in-process with the weights being trained; drop it")
        # Flags with a lowest allowed value; None, where a flag may be None, leaves it unset.
        for name, lowest in (("max_new_tokens", 1), ("num_generations", 2), ("per_device_train_batch_size", 1),
                             ("gradient_accumulation_steps", 1), ("save_total_limit", 1), ("warmup_steps", 0),
                             ("log_completions_steps", 0), ("missing_eos_penalty", 0), ("rpo_alpha", 0)):
            value = getattr(self, name)
            need(value is None or value >= lowest, f"--{name} must be >= {lowest}, got {value}")
        need(self.max_new_tokens < self.max_length, f"--max_new_tokens ({self.max_new_tokens}) must be smaller "
             f"than --max_length ({self.max_length}), which also holds the prompt")
        kwargs = self.generation_kwargs or {}
        need(isinstance(kwargs, dict) and set(kwargs) <= set(GENERATION_KWARGS), f"--generation_kwargs must be "
             f"a JSON object of {', '.join(GENERATION_KWARGS)}, got {json.dumps(kwargs)}")
        s = self.sampling()
        for name, ok, allowed in (("temperature", s["temperature"] > 0, "> 0"), ("top_k", s["top_k"] >= 0, ">= 0"),
                                  ("top_p", 0 < s["top_p"] <= 1, "in (0, 1]"),
                                  ("min_p", 0 <= s["min_p"] <= 1, "in [0, 1]"),
                                  ("repetition_penalty", s["repetition_penalty"] > 0, "> 0")):
            need(ok, f"--{name} must be {allowed}, got {s[name]}")
        need(not (self.judge and self.missing_eos_penalty is not None),
             "--missing_eos_penalty applies to reward scores; a --judge gives none, so drop it")
        scores = int(self.reward_model_path is not None) + len(self.reward_funcs or [])
        need(self.reward_weights is None or len(self.reward_weights) == scores, f"--reward_weights: "
             f"{len(self.reward_weights or [])} weights for {scores} reward model(s) and function(s)")
        need(len(self.beta) > 0 and min(self.beta) > 0, f"--beta must be > 0, got {self.beta}")
        need(0 <= self.label_smoothing < 0.5, f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        need(not (self.judge and self.num_generations != 2), "--num_generations: a pairwise judge compares "
             f"exactly 2 completions, got {self.num_generations}; use --reward_model_path or --reward_funcs")
        if self.use_peft:
            need(self.objective == "online_dpo", "--use_peft: LoRA is supported for --objective online_dpo only")
            need(self.lora_r >= 1 and self.lora_alpha > 0, "--lora_r must be >= 1 and --lora_alpha > 0")
            need(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.max_steps == -1 or self.max_steps > 0, f"--max_steps must be -1 or > 0, got {self.max_steps}")
        need(self.max_steps > 0 or self.num_train_epochs > 0,
             f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        need(self.lr_scheduler_type in SCHEDULERS, f"--lr_scheduler_type {self.lr_scheduler_type!r} is not "
             f"supported; use one of {', '.join(SCHEDULERS)}")
        need(0 <= self.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        need(self.logging_steps > 0, f"--logging_steps must be > 0, got {self.logging_steps}")
        for name in ("logging_steps", "save_steps"):
            value = getattr(self, name)
            # HF's rule: below 1 a fraction of the run, from 1 on a whole number of steps.
            need(value >= 0 and (value < 1 or value == int(value)),
                 f"--{name} must be a fraction below 1 or a whole number of steps, got {value}")
        for backend in self.report_to:
            need(backend in REPORT_TO, f"--report_to {backend!r} is not supported; use {', '.join(REPORT_TO)}")
        return self

    def sampling(self) -> dict:
        """The sampler's options: the flags, overridden by --generation_kwargs (as TRL does)."""
        options = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty} | (self.generation_kwargs or {})
        if isinstance(options.get("stop_strings"), str):  # transformers takes one string or a list
            options["stop_strings"] = [options["stop_strings"]]
        return options

    def to_dict(self) -> dict:
        """Every flag's value, for logs, model cards and checkpoints; the Hub token is masked as HF does."""
        return dataclasses.asdict(self) | ({"hub_token": "<HUB_TOKEN>"} if self.hub_token is not None else {})


class ConfigError(ValueError):
    pass


def interval(steps: float, total_steps: int) -> int:
    """Steps between two events for a *_steps flag: 0 off, below 1 a fraction of the run (rounded up, as HF)."""
    return math.ceil(steps * total_steps) if steps < 1 else int(steps)


# When --model_name_or_path is left out, train.py runs this small offline demo. Each value applies
# only where the user did not pass the flag, so `python train.py --max_steps 10` is the demo, shorter.
DEMO_DEFAULTS = {
    "model_name_or_path": "offline:SmolLM2-135M-Instruct", "output_dir": "out/minidpo-demo",
    "dataset_name": str(Path(__file__).with_name("prompts.jsonl")),
    # A rule reward rather than a judge, so that objective/scores shows the preference being learned:
    # shorter answers score higher, and an answer cut off before EOS loses 1.
    "reward_funcs": ["minidpo.judges:brevity"], "missing_eos_penalty": 1.0,
    # Sized to show learning in a few minutes on two CPU cores (bf16 autocast: ~7 s a step). bf16 only
    # where it is fast (cpu.fast_bf16, parse_args): on an AVX2 CPU a bf16 product takes 4x an fp32 one.
    "max_steps": 30, "per_device_train_batch_size": 8, "max_new_tokens": 48, "learning_rate": 2e-5,
    "logging_steps": 2, "log_completions_steps": 10, "save_steps": 0,
}

# Flags of accelerate, DeepSpeed, PEFT or the HF Trainer carried over from the reference's commands: each gets
# a message saying what to do instead, rather than argparse's "unrecognized".
UNSUPPORTED = {
    "config_file": "accelerate's config is not needed: launch with torchrun --nproc_per_node=N train.py",
    "num_processes": "pass it to torchrun as --nproc_per_node",
    "deepspeed": "minidpo shards with FSDP2 under torchrun; drop --deepspeed",
    "fsdp": "minidpo always shards with FSDP2 when run with more than one process; drop --fsdp",
    "fsdp_config": "minidpo always shards with FSDP2 when run with more than one process; drop --fsdp_config",
    "fp16": "use --bf16 (fp16 needs loss scaling, which minidpo does not do)",
    "dtype": "use --torch_dtype",
    **dict.fromkeys(("load_in_4bit", "load_in_8bit"),
                    "quantised training (bitsandbytes) is not supported; use --use_peft with --torch_dtype bfloat16"),
    "use_dora": "DoRA is not supported; use --use_peft (LoRA), optionally with --use_rslora",
    "trust_remote_code": "minidpo runs its own Llama/Qwen2/GPT-NeoX code and never remote code; drop it",
    "attn_implementation": "minidpo always uses torch's scaled_dot_product_attention; drop it",
    "tpu_num_cores": "TPUs are not supported; run on CUDA GPUs or CPU under torchrun",
    "use_liger_kernel": "Liger kernels are not used; drop it",
    "optim": "minidpo always uses torch.optim.AdamW; drop it",
    **dict.fromkeys(("eval_strategy", "dataset_test_split"), "minidpo has no evaluation loop; drop it"),
}


# HfArgumentParser's spellings, so `--bf16`, `--bf16 true` and `--bf16 False` all work.
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _bool(text: str) -> bool:
    if text.lower() not in BOOLS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return BOOLS[text.lower()]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as every other error of train.py, not argparse's usage and "train.py: error: ...".
        self.exit(2, f"error: {message}\n")


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {UNSUPPORTED[self.dest]}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train.py", usage="torchrun [--nproc_per_node=N] train.py [--flag value ...]",
        description="Online DPO in raw PyTorch. Without --model_name_or_path: the offline demo.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=40, width=110),
        allow_abbrev=False,  # otherwise --bf would mean --bf16, and HF's --no_cuda would mean --no_cuda_graphs
        argument_default=argparse.SUPPRESS)  # absent flags stay out of the namespace: we see what was given
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    for f in dataclasses.fields(Config):
        group = groups[f.metadata["section"]]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = f.metadata["help"] + ("" if default is None else f" (default: {shown})")
        kind = f.type
        if type(None) in typing.get_args(kind):  # `int | None` converts like int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            group.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, metavar="BOOL", help=text)
            if default:  # as in HfArgumentParser, a flag that is on by default also has a --no_ form
                group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif kind is dict:
            group.add_argument(f"--{f.name}", type=json.loads, metavar="JSON", help=text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            group.add_argument(f"--{f.name}", type=item, nargs="+", metavar=item.__name__.upper(), help=text)
        else:
            group.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(), help=text)
    for name in UNSUPPORTED:
        parser.add_argument(f"--{name}", nargs="?", action=_Unsupported, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the command line (sys.argv[1:] by default), validated; bad input exits 2 with one line."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "model_name_or_path" not in given:
        demo = {k: v for k, v in DEMO_DEFAULTS.items() if k not in given}
        if "bf16" not in given:
            demo["bf16"] = fast_bf16()
        if {"judge", "reward_model_path", "reward_funcs"} & given.keys():  # the user chose the scorer
            demo.pop("reward_funcs", None)
            if "judge" in given:  # a judge gives no scores to penalise
                demo.pop("missing_eos_penalty", None)
        given = {**demo, **given}
    try:
        return Config(**given).validate()
    except ConfigError as e:
        parser.error(str(e))
