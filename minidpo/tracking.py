"""Where metrics go: stdout, output_dir/metrics.jsonl, and TensorBoard or W&B when asked for.

Only rank 0 writes; the trainer reduces metrics over ranks before they get here.
"""

import json
import sys
import time
from pathlib import Path


class Tracker:
    def __init__(self, cfg, output_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.last_logged_step = resume_step
        self.last_metrics = {}
        self.started = time.perf_counter()
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = output_dir / "metrics.jsonl"
        self.completions = output_dir / "completions.jsonl"
        # A fresh run starts fresh logs. A resumed one keeps what was logged up to its checkpoint and
        # drops the rest, which the run is about to log again.
        for log in (self.jsonl, self.completions):
            log.write_text("".join(logged_up_to(log, resume_step)))
        run_name = cfg.run_name or output_dir.name
        if "tensorboard" in cfg.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--report_to tensorboard needs: pip install 'minidpo[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(output_dir / "runs" / run_name))
        if "wandb" in cfg.report_to:
            try:
                import wandb
            except ImportError:
                raise ImportError("--report_to wandb needs: pip install 'minidpo[wandb]'") from None
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
                for row in rows:
                    f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def logged_up_to(log: Path, step: int) -> list[str]:
    """The lines of a JSON-lines log with "step" <= step, each ending in a newline. A line that is
    not JSON is the torn end of a killed run's last write: it is dropped."""
    if not log.exists():
        return []
    keep = []
    for line in log.read_text().splitlines():
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
    done = int(20 * step / total)
    bar = "#" * done + "." * (20 - done)
    minutes, seconds = divmod(int(elapsed), 60)
    parts = [f"[{bar}] {step}/{total} {minutes}m{seconds:02d}s"]
    parts += [f"{name.split('/')[-1]} {metrics[name]:.4g}" for name in SHOWN if name in metrics]
    return " | ".join(parts)


def error_line(e: BaseException) -> str:
    """An exception as one line for the user: its message's first line, or its type if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def print_error(message: str):
    print(f"error: {message}", file=sys.stderr)
