"""Plot a training log: `python -m minidpo.plot OUTPUT_DIR_OR_METRICS_JSONL [--out PNG]`.

One panel per headline metric over steps; metrics the run did not log (a judge logs no scores)
are left out. Needs matplotlib, the optional extra `minidpo[plot]`."""

import argparse
import json
import sys
from pathlib import Path

from .common import optional_import

METRICS = ["rewards/chosen", "rewards/rejected", "objective/scores", "objective/kl"]


def plot(metrics_path, out=None) -> Path:
    matplotlib = optional_import("matplotlib", "plotting needs matplotlib", "'minidpo[plot]'")
    matplotlib.use("Agg")  # write files only; never open a window or need a display
    import matplotlib.pyplot as plt

    path = Path(metrics_path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = [m for m in METRICS if any(m in r for r in rows)]
    if not names:
        raise ValueError(f"{path}: none of {', '.join(METRICS)} was logged")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        logged = [r for r in rows if name in r]
        ax.plot([r["step"] for r in logged], [r[name] for r in logged])
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    out = Path(out) if out else path.with_name("metrics.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot a minidpo metrics.jsonl to a PNG.")
    p.add_argument("path", help="an output_dir or its metrics.jsonl")
    p.add_argument("--out", help="the PNG to write (default: metrics.png beside metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        print(plot(args.path, args.out))
    except (ImportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
