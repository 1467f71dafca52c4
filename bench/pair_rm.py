"""PairRM's cost per judged pair: minidpo's PairRM against transformers' DebertaV2Model with the same
head (the encoder llm-blender runs), same random weights in PairRM's shape (DeBERTa-v3-large: 24
layers, hidden 1024, 16 heads, FFN 4096, vocabulary 128005), same rows.

A judged pair is two rows, one per order, of 4 + prompt + 2 x (3 + completion) tokens
([CLS] prefix text [SEP] per segment). Timing is the encoder and head only, tokenizing not included.
The two sides run in turn after a warm-up of each; medians of the repeats.

    python bench/pair_rm.py                                      # CPU, fp32, 8 pairs of 64 + 2 x 128 tokens
    python bench/pair_rm.py --device cuda --dtype bfloat16 --pairs 64
    python bench/pair_rm.py --judge_model DIR                    # real PairRM weights instead
"""

import argparse
import resource
import statistics
import time

import torch
import transformers as T

from minidpo import cpu
from minidpo.pair_rm import EncoderConfig, PairRM, PairRMJudge, hf_name

SHAPE = dict(vocab_size=128005, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16)


def models(args):
    """(ours, transformers' encoder) with the same weights, in args.dtype on args.device."""
    if args.judge_model:
        ours = PairRMJudge.from_pretrained(args.judge_model).model
    else:
        torch.manual_seed(0)
        ours = PairRM(EncoderConfig(**{**SHAPE, "num_layers": args.layers}))
    cfg = ours.cfg
    ref = T.DebertaV2Model(T.DebertaV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, relative_attention=True,
        position_buckets=cfg.position_buckets, max_relative_positions=cfg.max_relative_positions,
        pos_att_type="p2c|c2p", share_att_key=cfg.share_att_key, norm_rel_ebd="layer_norm", position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ours_state = ours.state_dict()
    ref.load_state_dict({hf_name(k).removeprefix("pretrained_model."): v for k, v in ours_state.items()
                         if not k.startswith("head.")})
    return [m.to(args.device, args.dtype).eval() for m in (ours, ref)]


def rows(args, cfg):
    """ids, mask [2 * pairs, N] and the prefix positions [2 * pairs, 3] of random tokens."""
    n = 4 + args.prompt_tokens + 2 * (3 + args.completion_tokens)
    ids = torch.randint(5, cfg.vocab_size - 5, (2 * args.pairs, n))
    positions = torch.tensor([1, args.prompt_tokens + 4, args.prompt_tokens + args.completion_tokens + 7])
    return ids.to(args.device), torch.ones_like(ids), positions.expand(len(ids), 3).to(args.device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--completion_tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=24, help="fewer for a quick look (random weights only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--judge_model", help="a PairRM directory: its weights instead of random ones")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    ours, ref = models(args)
    ids, mask, positions = rows(args, ours.cfg)
    cuda = args.device.startswith("cuda")

    def run_ours():
        return ours(ids, mask, positions)

    def run_ref():  # the same gather and head on transformers' hidden states
        h = ref(ids, attention_mask=mask).last_hidden_state
        source, first, second = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1])).unbind(1)
        return (ours.head(torch.cat([source, first], -1)) - ours.head(torch.cat([source, second], -1)))[:, 0]

    times, peaks = {"minidpo": [], "transformers": []}, {}
    with torch.inference_mode():
        assert (run_ours() - run_ref()).abs().max() < (1e-3 if args.dtype == torch.float32 else 0.5)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("minidpo", run_ours), ("transformers", run_ref)):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = torch.cuda.max_memory_allocated() / 2**30
                times[name].append(time.perf_counter() - start)
    print(f"{cpu.cpu_model()}, torch {torch.__version__}, transformers {T.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device}, {args.dtype}, {args.pairs} pairs x 2 rows x "
          f"{ids.shape[1]} tokens, {ours.cfg.num_layers} layers")
    if not cuda:
        print(f"peak resident memory of the process (both models): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    for name, values in times.items():
        median = statistics.median(values)
        memory = f", peak {peaks[name]:.2f} GiB allocated" if cuda else ""
        print(f"{name}: {median / args.pairs * 1000:.1f} ms per judged pair ({args.pairs / median:.2f} pairs/s){memory}")


if __name__ == "__main__":
    main()
