"""Metrics: summed over micro-batches, steps and ranks (Metrics), then written to stdout,
output_dir/metrics.jsonl, and TensorBoard or W&B when asked for (Tracker, rank 0 only)."""

import json
import time
from pathlib import Path

import torch

from .common import optional_import
from .distributed import all_reduce_sum


class Metrics:
    """Named metrics as (sum, count) pairs, added up over micro-batches, steps and ranks; a mean is taken only at the
    end: ranks and micro-batches hold different numbers of decided pairs, and a mean of means would misweigh them."""

    def __init__(self, totals: dict | None = None):
        self.totals = totals or {}  # name -> (sum, count), 0-dim tensors or floats

    def add(self, metrics: dict):  # {name: (sum, count)}
        for name, (s, c) in metrics.items():
            prev_s, prev_c = self.totals.get(name, (0.0, 0.0))
            self.totals[name] = (prev_s + s, prev_c + c)

    def reduce(self, device) -> "Metrics":
        """The totals summed over all ranks, in one all-reduce (float64, so beta reads 0.1)."""
        names = sorted(self.totals)
        packed = torch.tensor([[float(v) for v in self.totals[n]] for n in names], dtype=torch.float64)  # [names, 2]
        packed = all_reduce_sum(packed.to(device)).cpu()
        return Metrics({name: tuple(pair) for name, pair in zip(names, packed.tolist())})

    def means(self) -> dict[str, float]:
        """{name: sum / count}; metrics with count 0 (e.g. no decided pair) are left out."""
        return {name: float(s / c) for name, (s, c) in self.totals.items() if c > 0}


class Tracker:
    def __init__(self, cfg, output_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled, self.last_logged_step, self.last_metrics = enabled, resume_step, {}
        self.started = time.perf_counter()
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.completions = output_dir / "metrics.jsonl", output_dir / "completions.jsonl"
        # A fresh run starts fresh logs; a resumed one keeps those up to its checkpoint, the rest to be logged again.
        for log in (self.jsonl, self.completions):
            log.write_text("".join(logged_up_to(log, resume_step)))
        run_name = cfg.run_name or output_dir.name
        if "tensorboard" in cfg.report_to:
            tensorboard = optional_import("torch.utils.tensorboard", "--report_to tensorboard needs",
                                          "'minidpo[tensorboard]'")
            self.tensorboard = tensorboard.SummaryWriter(str(output_dir / "runs" / run_name))
        if "wandb" in cfg.report_to:
            wandb = optional_import("wandb", "--report_to wandb needs", "'minidpo[wandb]'")
            self.wandb = wandb.init(name=run_name, config=cfg.to_dict())

    def log(self, step: int, total_steps: int, metrics: dict):
        self.last_logged_step = step
        if not self.enabled:
            return
        self.last_metrics = metrics
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        print(progress_line(step, total_steps, time.perf_counter() - self.started, metrics), flush=True)

    def log_completions(self, step: int, rows: list[dict]):
        """A table of sample completions (the reference's LogCompletionsCallback), one JSON row each."""
        if self.enabled:
            with self.completions.open("a") as f:
                f.writelines(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def logged_up_to(log: Path, step: int) -> list[str]:
    """The lines of a JSON-lines log with "step" <= step, each ending in a newline. A line that is
    not JSON is the torn end of a killed run's last write: it is dropped."""
    keep = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            logged_step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
        if logged_step <= step:
            keep.append(line + "\n")
    return keep


SHOWN = ("loss", "objective/scores", "rewards/margins", "rewards/accuracies", "objective/kl",
         "val/contain_eos_token", "learning_rate", "step_time", "memory/peak_gib")


def progress_line(step: int, total: int, elapsed: float, metrics: dict) -> str:
    """`[####......] 12/40 2m03s | loss 0.69 | ...`: a progress bar and the headline metrics."""
    bar = ("#" * int(20 * step / total)).ljust(20, ".")
    minutes, seconds = divmod(int(elapsed), 60)
    parts = [f"[{bar}] {step}/{total} {minutes}m{seconds:02d}s"]
    parts += [f"{name.split('/')[-1]} {metrics[name]:.4g}" for name in SHOWN if name in metrics]
    return " | ".join(parts)
