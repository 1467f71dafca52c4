"""The one stand-in sampler of the tests: the trainer's `sampler` attribute is its seam."""

import torch

from minidpo.sampler import Completions


class FixedSampler:
    """Sampler.generate's stand-in: each prompt's n completions are a function of the prompt's
    tokens alone, not of the batch it is in, the rank or a generator (real sampling draws one random
    number per row, so batches of 2 and of 4 prompts would sample different completions). Tokens
    are drawn from [low, high); a completion ends with EOS at a drawn length or runs to
    max_new_tokens without one."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def generate(self, input_ids, attention_mask, n=1, max_new_tokens=64, eos_token_ids=(), pad_token_id=0,
                 **kwargs) -> Completions:
        ids, masks = [], []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            tokens = [t for t, m in zip(row, mask) if m]
            g = torch.Generator().manual_seed(sum((i + 1) * t for i, t in enumerate(tokens)))
            for _ in range(n):
                completion = torch.randint(self.low, self.high, (max_new_tokens,), generator=g)
                length = int(torch.randint(1, max_new_tokens + 1, (), generator=g))
                if length < max_new_tokens and eos_token_ids:  # ends with EOS, then padding
                    completion[length - 1] = eos_token_ids[0]
                    completion[length:] = pad_token_id
                else:
                    length = max_new_tokens
                ids.append(completion)
                masks.append(torch.arange(max_new_tokens) < length)
        ids, mask = torch.stack(ids), torch.stack(masks).long()
        has_eos = torch.tensor([bool(eos_token_ids) and int(r[m.sum() - 1]) in eos_token_ids
                                for r, m in zip(ids, mask)])
        return Completions(ids, mask, has_eos)
