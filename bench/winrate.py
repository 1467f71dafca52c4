"""Win rate of a model against a baseline, as judged by any minidpo judge or reward model.

The model answers each prompt (greedy by default, so a run is repeatable); the baseline is either a
file of reference answers (jsonl rows {"prompt", "completion"}) or a second model answering the same
prompts; either model may be a LoRA adapter directory. Each pair goes to the judge, the model's
answer shown first (judges that look at both answers at once shuffle the order themselves). Ties, the judge's -1, count for neither side: the
win rate and its 95% Wilson interval are over the decided pairs, and the ties are reported beside.

    python bench/winrate.py --model_name_or_path out/ --baseline_model offline:SmolLM2-135M-Instruct \
        --judge llm --output winrate.jsonl
    python bench/winrate.py --model_name_or_path out/ --reference_file refs.jsonl --judge pair_rm
    python bench/winrate.py --model_name_or_path out/ --reference_file refs.jsonl --reward_model_path rm/
"""

import argparse
import json
import math
import sys
from importlib import resources
from pathlib import Path

import torch

from minidpo.common import error_line, print_error
from minidpo.data import _text, load_prompts, read_rows
from minidpo.lora import load_pretrained_or_adapter
from minidpo.judges import RewardModel, RewardModelJudge, make_judge
from minidpo.sampler import Sampler


def wilson_interval(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion wins/n. Unlike p ± z·sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not empty at 0/n or n/n, which small evaluations often hit."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def generate(path, prompts, args, seed) -> list[str]:
    model, tokenizer = load_pretrained_or_adapter(path, device=args.device)
    sampler = Sampler(model.eval())
    generator = torch.Generator(args.device).manual_seed(seed)
    completions = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids, mask = tokenizer.encode_rows(batch)
        out = sampler.generate(ids, mask, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               eos_token_ids=tokenizer.eos_token_ids, pad_token_id=tokenizer.pad_token_id,
                               generator=generator)
        completions += tokenizer.batch_decode(out.ids.tolist())
    return completions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default="offline:SmolLM2-135M-Instruct",
                   help="a model, or a LoRA adapter directory (its base model with the adapter merged in)")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--reference_file", help='jsonl of {"prompt", "completion"}: its prompts are used')
    side.add_argument("--baseline_model", help="a second model answering the same prompts")
    p.add_argument("--prompts", default=str(resources.files("minidpo") / "prompts.jsonl"),
                   help="jsonl with a prompt column (with --baseline_model)")
    p.add_argument("--num_prompts", type=int, help="the first N prompts (default: all)")
    p.add_argument("--judge", default="shorter", help="a judge name for minidpo.judges.make_judge")
    p.add_argument("--judge_model", help="with --judge llm or pair_rm: the judging model "
                   "(pair_rm's default: llm-blender/PairRM)")
    p.add_argument("--reward_model_path", help="judge with this reward model instead of --judge")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="winrate.jsonl", help="where to save every judgment (jsonl)")
    return p.parse_args(argv)


def read_references(path: str) -> tuple[list, list[str]]:
    """(prompts, completions) of a reference file; a bad line gets one error naming it."""
    prompts, completions = [], []
    for where, row in read_rows(Path(path)):
        if not isinstance(row.get("completion"), str):
            raise ValueError(f"{where}: no string 'completion' column")
        prompts.append(_text(row, "prompt", where))
        completions.append(row["completion"])
    return prompts, completions


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print_error(error_line(e))
        return 1


def evaluate(args) -> int:
    if args.reference_file:
        prompts, baseline = read_references(args.reference_file)
    else:
        prompts = [row["prompt"] for row in load_prompts(args.prompts)]
    prompts = prompts[:args.num_prompts]
    completions = generate(args.model_name_or_path, prompts, args, args.seed)
    if args.baseline_model:
        # Another seed: sampled against itself, a model should meet its own noise, not a copy of each answer.
        baseline = generate(args.baseline_model, prompts, args, args.seed + 1)
    baseline = baseline[:len(prompts)]

    if args.reward_model_path:
        judge = RewardModelJudge(RewardModel.from_pretrained(args.reward_model_path, device=args.device))
    else:
        options = {"path": args.judge_model} if args.judge_model else {}
        if args.judge in ("llm", "pair_rm"):  # model judges: on the same device as the models
            options["device"] = args.device
        judge = make_judge(args.judge, **options)
    verdicts = judge.judge(prompts, list(zip(completions, baseline)))

    winners = [{0: "model", 1: "baseline"}.get(v, "tie") for v in verdicts]
    with open(args.output, "w") as f:
        for row in zip(prompts, completions, baseline, winners):
            f.write(json.dumps(dict(zip(("prompt", "model", "baseline", "winner"), row)), ensure_ascii=False) + "\n")
    wins, ties = winners.count("model"), winners.count("tie")
    decided = len(winners) - ties
    low, high = wilson_interval(wins, decided)
    rate = f"{100 * wins / decided:.2f}%" if decided else "n/a"
    print(f"Model win rate: {rate} (95% CI [{100 * low:.2f}%, {100 * high:.2f}%], n={decided}, ties={ties}; "
          f"ties count for neither side) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
