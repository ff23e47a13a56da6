"""fastvae under DistributedDataParallel: two processes with the gloo backend, on the test
device (gloo all-reduces CUDA tensors too, so both ranks can share one GPU; NCCL would need a
GPU per rank)."""
import socket
import time

import pytest
import torch

import ddp_worker as w
import oracle
from cases import TEST_DEVICE

DDP_TIMEOUT_S = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(backend, prefix, world):
    workers = torch.multiprocessing.start_processes(
        w.run, args=(world, _free_port(), prefix, backend, str(TEST_DEVICE)), nprocs=world,
        join=False, start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker fails
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {DDP_TIMEOUT_S} s")
    return [torch.load(f"{prefix}.rank{r}.pt") for r in range(world)]


def test_ddp_gradients_match_one_process(backend, tmp_path):
    """'mean': DDP's averaged gradients equal one process on the whole batch. 'sum': they equal
    the whole-batch gradients divided by the world size (multiply the loss by it). Free bits:
    each rank decides active dims on its own shard, so DDP equals the mean of per-shard runs,
    not the whole-batch run."""
    world = 2
    ranks = _run_workers(backend, str(tmp_path / "grads"), world)
    x, shift = w.data(TEST_DEVICE)
    seeds = [w.SEED + r for r in range(world)]

    def single(rows, seeds, reduction, free_bits):
        model = w.make_model(TEST_DEVICE)
        model(x[rows], shift[rows], seeds, reduction, free_bits).backward()
        return w.gradients(model)

    whole = slice(None)
    close = dict(rtol=1e-5, atol=1e-6)
    for scenario in w.SCENARIOS:
        for name in ranks[0][scenario]:  # the all-reduce leaves every rank with the same grads
            torch.testing.assert_close(ranks[1][scenario][name], ranks[0][scenario][name], **close)
    ddp = {scenario: ranks[0][scenario] for scenario in w.SCENARIOS}

    want = single(whole, seeds, "mean", 0.0)
    for name in want:
        torch.testing.assert_close(ddp[("mean", 0.0)][name], want[name], **close)

    want = single(whole, seeds, "sum", 0.0)
    for name in want:
        torch.testing.assert_close(world * ddp[("sum", 0.0)][name], want[name], **close)

    # free bits: latent dim 0 is active on rank 0's shard and on the whole batch, not on rank 1's
    model = w.make_model(TEST_DEVICE)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        kl = oracle.kl_elements(mu + shift, logvar)  # [B, d]
    halves = [kl[w.shard(r, world)].mean(0) for r in range(world)]
    assert halves[0][0] >= w.FREE_BITS > halves[1][0] and kl.mean(0)[0] >= w.FREE_BITS
    scenario = ("mean", w.FREE_BITS)
    per_shard = [single(w.shard(r, world), [seeds[r]], *scenario) for r in range(world)]
    whole_batch = single(whole, seeds, *scenario)
    for name in whole_batch:
        torch.testing.assert_close(ddp[scenario][name], sum(g[name] for g in per_shard) / world, **close)
    encoder_grad = ddp[scenario]["encoder.weight"]
    assert not torch.allclose(encoder_grad, whole_batch["encoder.weight"], **close), \
        "free bits on local shards should differ from free bits on the whole batch here"
