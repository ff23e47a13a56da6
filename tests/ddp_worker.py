"""The DistributedDataParallel side of ``test_distributed.py``: a tiny VAE, its data, and the
worker ``torch.multiprocessing.spawn`` runs in each process (it must live in an importable
module, not in the test file's closures). Everything lives on the device it is given: gloo
all-reduces CUDA tensors as well, so two ranks can share one GPU."""
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastvae

BATCH, FEATURES, LATENT, SAMPLES = 8, 6, 3, 2
SEED = 1000  # rank r draws its noise from seed SEED + r
FREE_BITS = 1.5
# (reduction, free_bits) for each backward pass the worker records
SCENARIOS = (("mean", 0.0), ("sum", 0.0), ("mean", FREE_BITS))


class TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, 2 * LATENT)
        self.decoder = nn.Linear(LATENT, 2 * FEATURES)

    def forward(self, x, shift, seeds, reduction, free_bits):
        """The loss of a batch made of ``len(seeds)`` equal chunks, chunk i's noise drawn with
        seed ``seeds[i]``: one chunk on a DDP rank, every rank's chunk in the single-process run."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        mu = mu + shift
        z = torch.cat([fastvae.reparameterize(m, lv, SAMPLES, seed=s) for m, lv, s in
                       zip(mu.chunk(len(seeds)), logvar.chunk(len(seeds)), seeds)], dim=1)
        x_hat, x_logvar = self.decoder(z).chunk(2, dim=-1)
        return fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, free_bits=free_bits,
                                 reduction=reduction)


def make_model(device="cpu"):
    torch.manual_seed(0)
    return TinyVAE().to(device)


def data(device="cpu"):
    """x, and a shift of the encoder means that puts latent dim 0 of the first half of the batch
    (rank 0's shard) far from the prior: with free bits its batch-mean KL is above λ on rank 0
    and on the whole batch, below λ on rank 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, FEATURES, generator=g)
    shift = torch.zeros(BATCH, LATENT)
    shift[:BATCH // 2, 0] = 3.0
    return x.to(device), shift.to(device)


def shard(rank, world_size):
    size = BATCH // world_size
    return slice(rank * size, (rank + 1) * size)


def gradients(model):
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


def run(rank, world_size, port, out_prefix, backend, device):
    """One DDP rank: for each scenario, backward on the local shard; save the all-reduced grads.

    The process ends with ``os._exit``, skipping the process group's teardown: in this torch
    (2.13) freeing a gloo process group right after a backward can deadlock. A finished
    all-reduce keeps the backward's ``contextvars.Context`` (stashed in thread-local state by
    ``torch.autograd``) and the gloo thread needs the GIL to free it, while the main thread holds
    the GIL joining that thread in ``~ProcessGroupGloo`` (seen here; pytorch/pytorch#182083)."""
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)  # two processes on a two-core machine
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fastvae.set_backend(backend)
        ids = [device.index or 0] if device.type == "cuda" else None
        model = DistributedDataParallel(make_model(device), device_ids=ids)
        x, shift = data(device)
        local = shard(rank, world_size)
        results = {}
        for reduction, free_bits in SCENARIOS:
            model.zero_grad(set_to_none=True)
            loss = model(x[local], shift[local], [SEED + rank], reduction, free_bits)
            loss.backward()
            results[(reduction, free_bits)] = gradients(model.module)
        torch.save(results, f"{out_prefix}.rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
