"""CUDA graphs under FSDP2 (GPU only): the sampler on a fully_shard'ed policy, one NCCL rank.

FSDP2 reallocates the gathered weights at every gather, so the decode graph captured in one
rollout points at freed memory in the next; the sampler's address check must recapture, and
decoding must keep matching eager decoding on the trained weights.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import minidpo
from minidpo.distributed import gathered
from minidpo.sampler import Sampler
from sampler_world import prompts, reference

pytestmark = pytest.mark.gpu


@pytest.fixture
def one_rank(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    yield init_device_mesh("cuda", (1,))
    dist.destroy_process_group()


def test_graphs_recapture_per_rollout_and_follow_training(one_rank, tmp_path):
    reference("llama").save_pretrained(tmp_path)
    policy = minidpo.load_model(str(tmp_path), device="cuda")
    plain = minidpo.load_model(str(tmp_path), device="cuda")  # eager decoding on the same weights
    twin = minidpo.load_model(str(tmp_path), device="cuda")  # trained alongside, without FSDP
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for block in policy.layers:
        fully_shard(block, mesh=one_rank)
    fully_shard(policy, mesh=one_rank)
    sampler = Sampler(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids, mask = prompts([7, 3, 10, 1])
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(n=2, max_new_tokens=16, temperature=0, pad_token_id=0)
    seen = []
    for rollout in range(3):
        with gathered(policy):
            out = sampler.generate(ids, mask, **kwargs).ids
        plain.load_state_dict({k: v.full_tensor() for k, v in policy.state_dict().items()})
        assert torch.equal(out, Sampler(plain, cuda_graphs=False).generate(ids, mask, **kwargs).ids)
        seen.append(out)
        for model, opt in ((policy, optimizer), (twin, twin_optimizer)):
            loss = model(ids, mask).float().logsumexp(-1).mean()  # any loss: the weights must move
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert not torch.equal(seen[0], seen[-1])
    # One FSDP rank takes the same steps as the plain model (NCCL cannot put two ranks on one GPU).
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name].full_tensor(), value, rtol=0, atol=1e-5)
    assert sampler.captures == 3  # one per rollout: the gathered weights live at new addresses each time
