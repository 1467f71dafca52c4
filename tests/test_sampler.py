"""minidpo.sampler: cached decoding against full forwards and transformers' generate, the sampling
filters against their analytic distributions, EOS handling, reuse of one Sampler, and (on CUDA)
CUDA-graph decoding against eager decoding."""

import copy
import math

import pytest
import torch
import transformers as T

import minidpo
from minidpo import cpu
from minidpo.sampler import Sampler, generate, penalize_repetition, sample
from sampler_world import FAMILIES, PAD, VOCAB, prompts, reference

def build(tmp_path_factory, family):
    """(transformers model, minidpo model) with the same weights, through save/load."""
    ref = reference(family)
    path = tmp_path_factory.mktemp(family)
    ref.save_pretrained(path)
    return ref, minidpo.load_model(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build(tmp_path_factory, "llama")


def greedy(model_or_sampler, ids, mask, **kwargs):
    kwargs = {"temperature": 0, "max_new_tokens": 12, "pad_token_id": PAD, **kwargs}
    if isinstance(model_or_sampler, Sampler):
        return model_or_sampler.generate(ids, mask, **kwargs)
    return generate(model_or_sampler, ids, mask, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_matches_full_forward(tmp_path_factory, family):
    _, model = build(tmp_path_factory, family)
    ids, mask = prompts([5, 9, 2])
    n, steps = 2, 4
    sampler = Sampler(model)
    seqs, seq_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        sampler.reserve(len(seqs), ids.shape[1] + steps)
        logits = sampler.prefill(ids, mask, n)
        for t in range(steps):
            full = model(seqs, seq_mask)[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
            # Siblings get different tokens, so each must decode from its own copy of the cache.
            token = torch.randint(1, VOCAB, (len(seqs),), generator=g)
            seqs = torch.cat([seqs, token[:, None]], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(token)[:, None]], 1)
            logits = sampler.decode(token, ids.shape[1] + t)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(tmp_path_factory, family):
    ref, model = build(tmp_path_factory, family)
    ids, mask = prompts([7, 3, 10, 1])
    ref.generation_config.eos_token_id = None  # the tiny configs name an EOS; these runs have none
    expected = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=PAD)[:, ids.shape[1]:]
    out = greedy(model, ids, mask)
    assert torch.equal(out.ids, expected)
    assert out.mask.all() and not out.has_eos.any()

    # With an EOS that one row reaches after 4 tokens and others never (or later): transformers
    # pads after it and stops when every row has stopped, as minidpo must.
    eos = int(expected[0, 3])
    expected = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:]
    out = greedy(model, ids, mask, eos_token_ids=[eos])
    assert torch.equal(out.ids, expected)


def test_padding_does_not_change_a_row(llama):
    _, model = llama
    ids, mask = prompts([4, 11, 7])
    alone = greedy(model, ids[:1, -4:], mask[:1, -4:]).ids
    in_batch = greedy(model, ids, mask).ids[:1]
    assert torch.equal(alone, in_batch)


def test_n_samples_share_a_prefill(llama):
    _, model = llama
    ids, mask = prompts([6, 3])
    one = greedy(model, ids, mask)
    three = greedy(model, ids, mask, n=3)
    assert torch.equal(three.ids, one.ids.repeat_interleave(3, 0))  # prompt-major rows
    assert not torch.equal(three.ids[0], three.ids[3])  # the two prompts differ, so the test can fail

    g = torch.Generator().manual_seed(0)
    sampled = generate(model, ids, mask, n=4, max_new_tokens=12, temperature=1.0, pad_token_id=PAD, generator=g)
    assert sampled.ids.shape == (8, 12)
    assert len({tuple(row.tolist()) for row in sampled.ids}) == 8


# Each case is (sampling arguments, the tokens it keeps): the analytic distribution is the
# softmax of logits / temperature over the kept tokens. The cases are built so that each filter
# removes something the others keep.
LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
FILTER_CASES = {
    "temperature": (dict(temperature=1.0), range(8)),
    "cold": (dict(temperature=0.5), range(8)),
    "hot": (dict(temperature=2.0), range(8)),
    "top_k": (dict(top_k=3), range(3)),
    # probabilities at T=1: .40 .25 .15 .09 .05 .03 .02 .003, cumulative .40 .65 .80 .89 ...
    "top_p": (dict(top_p=0.75), range(3)),
    # min_p 0.2 keeps p >= 0.2 * 0.40 = 0.081: tokens 0-3
    "min_p": (dict(min_p=0.2), range(4)),
    # T=0.7 and top_k 5 give .53 .26 .13 .06 .03; top_p 0.95 drops token 4 (.97 of the mass lies
    # above it); renormalised, token 3 has .065 < 0.2 * .54, so min_p drops it.
    "all": (dict(temperature=0.7, top_k=5, top_p=0.95, min_p=0.2), range(3)),
}


def analytic(temperature, kept):
    weights = [math.exp(x / temperature) if i in kept else 0.0 for i, x in enumerate(LOGITS)]
    return torch.tensor(weights) / sum(weights)


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_sampling_matches_analytic_distribution(case):
    kwargs, kept = FILTER_CASES[case]
    draws = 20_000
    logits = torch.tensor(LOGITS).expand(draws, -1)
    tokens = sample(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    freq = torch.bincount(tokens, minlength=len(LOGITS)).float() / draws
    expected = analytic(kwargs.get("temperature", 1.0), set(kept))
    assert (freq[expected == 0] == 0).all(), f"filtered tokens were drawn: {freq}"
    # The expected total variation of 20k draws over 8 tokens is about 0.007; a wrong filter or
    # temperature moves the distribution by more than 0.05 in every case above.
    assert 0.5 * (freq - expected).abs().sum() < 0.02, (freq, expected)


def test_greedy_sampling_is_argmax():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


def test_top_p_on_renormalised_top_k():
    # top_k 2 leaves probabilities .62/.38; top_p 0.6 must then keep only token 0.
    logits = torch.tensor([[2.0, 1.5, 1.0]]).expand(1000, -1)
    tokens = sample(logits, top_k=2, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert (tokens == 0).all()


def test_eos_padding_mask_and_early_stop(llama):
    _, model = llama
    ids, mask = prompts([6, 3, 8])
    free = greedy(model, ids, mask).ids  # 12 tokens per row, no EOS
    # Row 0 stops at its 3rd token, row 1 at its 6th; row 2 may hit either token, or neither.
    eos = [int(free[0, 2]), int(free[1, 5])]
    out = greedy(model, ids, mask, eos_token_ids=eos)
    for row in range(3):
        hits = [t for t in range(12) if int(free[row, t]) in eos]
        length = hits[0] + 1 if hits else 12
        assert torch.equal(out.ids[row, :length], free[row, :length])
        assert (out.ids[row, length:] == PAD).all()
        assert out.mask[row].tolist() == [1] * length + [0] * (out.ids.shape[1] - length)
        assert bool(out.has_eos[row]) == bool(hits)

    # Every row stops within 3 tokens: the loop must stop there too, not just trim its output.
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = greedy(model, ids, mask, eos_token_ids=free[:, 2].tolist())
    hook.remove()
    assert out.ids.shape[1] <= 3 and out.has_eos.all()
    assert len(calls) == out.ids.shape[1]  # one prefill and a decode per further token

    # min_new_tokens holds EOS back; max_new_tokens caps the length.
    out = greedy(model, ids, mask, eos_token_ids=free[:, 0].tolist(), min_new_tokens=5, max_new_tokens=7)
    assert out.ids.shape[1] <= 7
    assert not torch.isin(out.ids[:, :5], free[:, 0]).any()
    assert out.mask[:, :5].all()


def test_seeds_reproduce(llama):
    _, model = llama
    ids, mask = prompts([5, 2])
    kwargs = dict(n=2, max_new_tokens=10, temperature=1.0, top_k=50, pad_token_id=PAD)
    runs = [generate(model, ids, mask, generator=torch.Generator().manual_seed(s), **kwargs).ids for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_reused_sampler_equals_fresh_one(llama):
    _, model = llama
    model.train()
    sampler = Sampler(model)
    long_ids, long_mask = prompts([20, 13, 17], seed=2)
    greedy(sampler, long_ids, long_mask, n=2, max_new_tokens=30)
    # A shorter second call must neither see the first call's keys nor count its columns as positions.
    ids, mask = prompts([5, 2])
    kwargs = dict(n=2, max_new_tokens=10, temperature=1.0, pad_token_id=PAD)
    reused = sampler.generate(ids, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    fresh = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(reused.ids, fresh.ids)
    assert torch.equal(greedy(sampler, ids, mask).ids, greedy(model, ids, mask).ids)
    with torch.inference_mode():  # logits too, not only the tokens they lead to
        torch.testing.assert_close(sampler.prefill(ids, mask, 1), model(ids, mask)[:, -1], atol=1e-5, rtol=0)
    assert model.training  # generation leaves the model's mode alone


def test_completions_are_plain_tensors_and_stream_shares_the_cache(llama):
    # On CPU the sampler runs under inference_mode; what it returns must still serve training (a
    # tensor backward saves) and in-place edits, and stream() and generate() share one cache.
    _, model = llama
    sampler = Sampler(model)
    ids, mask = prompts([6, 4])
    out = greedy(sampler, ids, mask, n=2)
    assert not any(t.is_inference() for t in (out.ids, out.mask, out.has_eos))
    logps = torch.randn(out.mask.shape, requires_grad=True)
    (logps * out.mask).sum().backward()  # the product saves the mask for backward
    out.ids[:, 0] = PAD
    streamed = list(sampler.stream(ids[1:, -4:], max_new_tokens=6, temperature=0))
    assert streamed == greedy(sampler, ids[1:, -4:], mask[1:, -4:], max_new_tokens=6).ids[0].tolist()


def test_a_cpu_sampler_keeps_freed_memory_for_its_next_call(llama, monkeypatch):
    kept = []
    monkeypatch.setattr(minidpo.sampler, "keep_freed_memory", lambda: kept.append(True) or True)
    Sampler(llama[1])
    assert kept == [True]


def test_bf16_autocast_over_fp32_weights_matches_full_forwards(llama):
    # --bf16 keeps fp32 master weights and samples under autocast with a bf16 cache: the cached
    # decode must equal full forwards under the same autocast.
    _, model = llama
    ids, mask = prompts([7, 3, 10, 1])
    out = greedy(Sampler(model, dtype=torch.bfloat16), ids, mask, max_new_tokens=8).ids
    seq, seq_mask = ids, mask
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for _ in range(8):
            token = model(seq, seq_mask)[:, -1].float().argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, token], 1), torch.cat([seq_mask, torch.ones_like(token)], 1)
    assert torch.equal(out, seq[:, ids.shape[1]:])


def test_bf16_sampler_sees_in_place_weight_updates_between_calls(llama):
    # Without CUDA graphs autocast caches each weight's bf16 copy for one generate() call; the next
    # call, after an optimizer step, must cast the new values.
    model = copy.deepcopy(llama[1])  # the fixture's model is shared: update a copy
    ids, mask = prompts([7, 3, 10, 1])
    sampler = Sampler(model, dtype=torch.bfloat16)
    before = greedy(sampler, ids, mask, max_new_tokens=8).ids
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    after = greedy(sampler, ids, mask, max_new_tokens=8).ids
    assert not torch.equal(after, before)
    assert torch.equal(after, greedy(Sampler(model, dtype=torch.bfloat16), ids, mask, max_new_tokens=8).ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_reorders_each_weight_once_per_call(llama, dtype, monkeypatch):
    # cpu.reusing_weights: a weight's copy in oneDNN's layout serves every decode step of one call,
    # and the next call (after an optimizer step) makes new copies.
    _, model = llama
    monkeypatch.setenv("MINIDPO_CPU_MATMUL", "onednn")
    reordered = []
    monkeypatch.setattr(cpu, "_reorder", lambda w, f=cpu._reorder: reordered.append(w) or f(w))
    ids, mask = prompts([7, 3, 10, 1])
    sampler = Sampler(model, dtype=dtype)
    for _ in range(2):
        greedy(sampler, ids, mask, max_new_tokens=8)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # 4 a layer, and the head
    assert len(weights) == 4 * model.cfg.num_layers + 1
    # bf16: only where PyTorch's bf16 products are oneDNN's (AVX-512); on an AVX2 CPU, none.
    reorders = len(weights) if dtype == torch.float32 or cpu._onednn_bf16 else 0
    assert len(reordered) == 2 * reorders
    assert cpu._reordered is None


# ---- CUDA graphs (run with: python -m pytest tests/test_sampler.py -m gpu) ----

@pytest.fixture(scope="module")
def cuda_llama(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = tmp_path_factory.mktemp("cuda_llama")
    reference("llama").save_pretrained(path)
    return path


def update_in_place(model):
    """What the optimizer does to the weights: the same tensors, new values."""
    with torch.no_grad():
        g = torch.Generator(device="cuda").manual_seed(0)
        for p in model.parameters():
            p.data.add_(0.1 * torch.randn(p.shape, device="cuda", generator=g))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_greedy_matches_eager(cuda_llama, dtype):
    model = minidpo.load_model(str(cuda_llama), dtype=dtype, device="cuda")
    graphs, eager = Sampler(model), Sampler(model, cuda_graphs=False)
    # 4 prompts x 2 samples fill a power-of-two bucket exactly: both paths run the same shapes and
    # kernels, so even bf16 must agree token for token. The EOS stops rows at different steps.
    ids, mask = prompts([7, 3, 10, 1])
    free = greedy(eager, ids, mask, n=2, max_new_tokens=40).ids
    kwargs = dict(n=2, max_new_tokens=40, eos_token_ids=[int(free[0, 20])])
    out = greedy(graphs, ids, mask, **kwargs)
    assert torch.equal(out.ids, greedy(eager, ids, mask, **kwargs).ids)
    assert graphs.captures == 1 and eager.captures == 0
    if dtype == torch.float32:  # 3 rows run in a 4-row graph; fp32 leaves no room for near-ties
        assert torch.equal(greedy(graphs, ids[:3], mask[:3]).ids, greedy(eager, ids[:3], mask[:3]).ids)
        greedy(graphs, ids, mask, n=2)
        assert sorted(graphs.graphs) == [4, 8] and graphs.captures == 2  # one capture per bucket


@pytest.mark.gpu
def test_cuda_graph_sees_in_place_weight_updates(cuda_llama):
    model = minidpo.load_model(str(cuda_llama), device="cuda")
    graphs, eager = Sampler(model), Sampler(model, cuda_graphs=False)
    ids, mask = prompts([7, 3, 10, 1])
    before = greedy(graphs, ids, mask, n=2, max_new_tokens=24).ids
    update_in_place(model)
    after = greedy(graphs, ids, mask, n=2, max_new_tokens=24).ids
    assert not torch.equal(before, after)
    assert torch.equal(after, greedy(eager, ids, mask, n=2, max_new_tokens=24).ids)
    assert graphs.captures == 1
    # A replaced weight tensor lives at a new address, which the graph cannot see: recapture.
    model.lm_head.weight = torch.nn.Parameter(-model.lm_head.weight)
    replaced = greedy(graphs, ids, mask, n=2, max_new_tokens=24).ids
    assert torch.equal(replaced, greedy(eager, ids, mask, n=2, max_new_tokens=24).ids)
    assert graphs.captures == 2


@pytest.mark.gpu
def test_cuda_graph_sampling_matches_eager_with_a_seed(cuda_llama):
    model = minidpo.load_model(str(cuda_llama), device="cuda")
    ids, mask = prompts([7, 3, 10, 1])
    kwargs = dict(n=2, max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, pad_token_id=PAD)
    runs = [Sampler(model, cuda_graphs=graphs).generate(ids, mask, generator=torch.Generator("cuda").manual_seed(0),
                                                        **kwargs).ids for graphs in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
def test_cuda_graph_with_repetition_penalty_and_stop_strings_matches_eager(cuda_llama):
    # The penalty applies to the logits the graph wrote, outside the graph: both paths sample alike.
    model = minidpo.load_model(str(cuda_llama), device="cuda")
    ids, mask = prompts([7, 3, 10, 1])
    kwargs = dict(n=2, max_new_tokens=24, temperature=0.9, top_k=50, repetition_penalty=1.5, pad_token_id=PAD,
                  stop_strings=["1 2", "5"], decode=lambda row: " ".join(map(str, row)))
    runs = [Sampler(model, cuda_graphs=graphs).generate(ids, mask, generator=torch.Generator("cuda").manual_seed(0),
                                                        **kwargs) for graphs in (True, False)]
    assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].mask, runs[1].mask)
    assert not runs[0].mask.all()  # the stop strings cut some rows


@pytest.mark.gpu
def test_compiled_cuda_graph_matches_eager(cuda_llama):
    model = minidpo.load_model(str(cuda_llama), device="cuda")
    ids, mask = prompts([7, 3, 10, 1])
    compiled = greedy(Sampler(model, compile=True), ids, mask, n=2, max_new_tokens=24).ids
    assert torch.equal(compiled, greedy(Sampler(model, cuda_graphs=False), ids, mask, n=2, max_new_tokens=24).ids)


@pytest.mark.gpu
def test_cuda_graph_under_bf16_autocast_sees_weight_updates(cuda_llama):
    # Autocast's weight cache, if on, would bake bf16 copies of the weights into the graph.
    model = minidpo.load_model(str(cuda_llama), device="cuda")
    graphs = Sampler(model, dtype=torch.bfloat16)
    eager = Sampler(model, cuda_graphs=False, dtype=torch.bfloat16)
    ids, mask = prompts([7, 3, 10, 1])
    before = greedy(graphs, ids, mask, n=2, max_new_tokens=24).ids
    assert torch.equal(before, greedy(eager, ids, mask, n=2, max_new_tokens=24).ids)
    update_in_place(model)
    after = greedy(graphs, ids, mask, n=2, max_new_tokens=24).ids
    assert not torch.equal(before, after)
    assert torch.equal(after, greedy(eager, ids, mask, n=2, max_new_tokens=24).ids)
    assert graphs.captures == 1 and graphs.cache.k[0].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The sampling flags TRL has, end to end through generate(), against transformers' processors.


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(4, VOCAB, generator=g) * 3, torch.randint(0, VOCAB, (4, 30), generator=g)
    seen = torch.zeros(4, VOCAB, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.7, 0.6):
        expected = T.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(penalize_repetition(logits, seen, penalty), expected, rtol=0, atol=0)


def test_greedy_with_repetition_penalty_matches_transformers(llama):
    ref, model = llama
    ids, mask = prompts([5, 5, 5])  # no padding: transformers would count a pad token as seen
    ref.generation_config.eos_token_id = None
    expected = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                            repetition_penalty=1.8, pad_token_id=PAD)[:, ids.shape[1]:]
    out = greedy(model, ids, mask, max_new_tokens=16, repetition_penalty=1.8)
    assert torch.equal(out.ids, expected)
    assert not torch.equal(out.ids, greedy(model, ids, mask, max_new_tokens=16).ids)  # the penalty mattered


# Each flag (and all at once) strong enough to move the distribution far from the plain one.
FLAGS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.5),
    "min_p": dict(min_p=0.3),
    "repetition_penalty": dict(repetition_penalty=0.3),  # below 1: the prompt's tokens become likelier
    "all": dict(temperature=0.8, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.5),
}


def transformers_distribution(ref, ids, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """The next-token distribution transformers samples from with these flags, in its order."""
    processors = T.LogitsProcessorList([T.RepetitionPenaltyLogitsProcessor(repetition_penalty),
                                        T.TemperatureLogitsWarper(temperature)])
    processors += [T.TopKLogitsWarper(top_k)] if top_k else []
    processors += [T.TopPLogitsWarper(top_p)] if top_p < 1 else []
    processors += [T.MinPLogitsWarper(min_p)] if min_p else []
    with torch.no_grad():
        return processors(ids, ref(ids).logits[:, -1].double()).softmax(-1)[0].float()


@pytest.mark.parametrize("case", list(FLAGS))
def test_sampling_flags_match_transformers_distribution(llama, case):
    ref, model = llama
    ids, mask = prompts([12], seed=3)
    draws = 40_000  # one prompt, 40k samples of its first token
    out = Sampler(model, cuda_graphs=False).generate(ids, mask, n=draws, max_new_tokens=1, pad_token_id=PAD,
                                                     generator=torch.Generator().manual_seed(0), **FLAGS[case])
    freq = torch.bincount(out.ids[:, 0], minlength=VOCAB).float() / draws
    expected = transformers_distribution(ref, ids, **FLAGS[case])
    assert (freq[expected == 0] == 0).all(), "a filtered token was drawn"
    # 40k draws over this model's ~60 likely tokens: a total variation of about 0.015 by chance.
    assert 0.5 * (freq - expected).abs().sum() < 0.03
    assert 0.5 * (transformers_distribution(ref, ids) - expected).abs().sum() > 0.1  # the flag matters


def test_stop_strings_end_a_completion_but_are_no_eos(llama):
    _, model = llama
    ids, mask = prompts([6, 3, 8])
    free = greedy(model, ids, mask).ids
    decode = lambda row: " ".join(map(str, row))  # noqa: E731 (token ids as text)
    stop = f"{int(free[0, 3])} {int(free[0, 4])}"  # row 0 ends at its 5th token, or where it first says this
    eos = int(free[1, 2])  # row 1 ends with an EOS at its 3rd token, if not earlier
    out = greedy(model, ids, mask, eos_token_ids=[eos], stop_strings=[stop], decode=decode)
    for row in range(3):
        tokens = free[row].tolist()
        ends = [t for t in range(12) if tokens[t] == eos or stop in decode(tokens[:t + 1])]
        length = ends[0] + 1 if ends else 12
        assert out.mask[row].tolist() == [1] * length + [0] * (out.ids.shape[1] - length)
        assert torch.equal(out.ids[row, :length], free[row, :length]) and (out.ids[row, length:] == PAD).all()
        assert bool(out.has_eos[row]) == (bool(ends) and tokens[ends[0]] == eos)  # a stop string is no EOS
    assert out.mask[0].sum() <= 5 and not out.has_eos[0] and out.has_eos[1]
