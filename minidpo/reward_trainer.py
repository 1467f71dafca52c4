"""Training a Bradley-Terry reward model (--objective reward) on a preference dataset.

The loop, step shape, checkpoints and logging are trainer.py's. Collecting reads labelled pairs (prompt, chosen,
rejected) instead of sampling them; learning scores both and minimises -log sigma(r_chosen - r_rejected).
The model starts as the causal LM's body with a fresh one-output `score` head, saved as *ForSequenceClassification."""

from dataclasses import dataclass

import torch

from .checkpoint import load_model
from .data import load_preferences
from .distributed import shard
from .loss import bradley_terry_loss
from .model import last_token_scores
from .trainer import Trainer


@dataclass
class LabelledPairs:
    """B labelled pairs, each prompt + completion rendered with the model's own template."""

    ids: torch.Tensor  # [2B, T] right-padded: the B chosen rows, then the B rejected rows
    mask: torch.Tensor  # [2B, T]
    decided: torch.Tensor  # [B] bool, all True: every labelled pair counts in the loss


class RewardTrainer(Trainer):
    def build(self, model_dir) -> list:
        """The reward model to train; returns the preference rows."""
        cfg = self.cfg
        self.policy = shard(load_model(str(model_dir), device=self.dist.device, num_labels=1), self.dist, cfg.bf16)
        return load_preferences(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_config)

    def collect(self, micro_batches: list) -> list[LabelledPairs]:
        return [self.labelled_pairs(rows) for _, rows in micro_batches]

    def labelled_pairs(self, rows: list[dict]) -> LabelledPairs:
        prompts = [row["prompt"] for row in rows] * 2
        completions = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        ids, mask = self.tokenizer.encode_rows(prompts, completions, padding_side="right",
                                               max_length=self.cfg.max_length)
        device = self.dist.device
        return LabelledPairs(ids.to(device), mask.to(device), torch.ones(len(rows), dtype=torch.bool, device=device))

    def learn(self, batch: LabelledPairs, pairs: torch.Tensor) -> dict:
        """Backpropagate the batch's summed loss divided by `pairs`, the step's count; returns its metrics."""
        with self.autocast:
            scores = last_token_scores(self.policy(batch.ids, batch.mask), batch.mask)[:, 0]
        B = len(batch.decided)
        loss, accuracy, margin = bradley_terry_loss(scores[:B].float(), scores[B:].float())
        self.stop_unless_finite("loss", loss)
        (loss * B / pairs).backward()
        count = torch.tensor(float(B), device=scores.device)
        return {"loss": (loss.detach() * B, count), "rewards/accuracies": (accuracy * B, count),
                "rewards/margins": (margin * B, count)}
