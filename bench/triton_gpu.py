"""GPU benchmark of fastvae's Triton kernels (and the native CUDA build, if importable) against
plain PyTorch and torch.compile of it, timed with CUDA events.

    python -m bench.triton_gpu                     # the DESIGN.md workload, float32 and bfloat16
    python -m bench.triton_gpu --batch 8192 --event 12288 --dtypes float32 --json out.json

For each workload: the fused loss forward+backward (gradients of x_hat, x_logvar, mu, logvar)
and reparameterised sampling forward+backward. Each row reports the median time, the bytes the
pass must move at least (each input read once, each gradient written once), and that time as a
multiple of the bound ``bytes / measured device copy bandwidth`` (DESIGN.md §5).
Refuses to run without CUDA: the interpreter timings on CPU say nothing about GPU kernels.
"""
import argparse
import json
import math
import statistics
import sys

import torch

import fastvae
from fastvae import _backends

LOG_2PI = math.log(2 * math.pi)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plain_loss(x, x_hat, x_logvar, mu, logvar):
    nll = 0.5 * ((x - x_hat) ** 2 * torch.exp(-x_logvar) + x_logvar + LOG_2PI)
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)
    return (nll.sum(-1) + kl.sum(-1)).mean().float()


def plain_sample(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def fused_loss(backend):
    def loss(x, x_hat, x_logvar, mu, logvar):
        with fastvae.use_backend(backend):
            return fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar)
    return loss


def fused_sample(backend):
    def sample(mu, logvar):
        with fastvae.use_backend(backend):
            return fastvae.reparameterize(mu, logvar)
    return sample


def cuda_backends():
    """fastvae backends that run on CUDA here: 'triton' and, if built with CUDA, 'native'."""
    return [name for name in ("triton", "native")
            if name in fastvae.available_backends()
            and "cuda" in _backends.module(name).DEVICE_TYPES]


def time_ms(step, warmup, repeats):
    """Median milliseconds of ``step()`` over ``repeats`` runs, each timed with CUDA events."""
    for _ in range(warmup):  # includes Triton autotuning and torch.compile on the first call
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(warmup, repeats):
    """Device-to-device copy bandwidth in bytes/ms (read + write) of a 1 GiB buffer."""
    source = torch.empty(2**28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), warmup, repeats)
    return 2 * source.numel() * source.element_size() / ms


def loss_rows(args, dtype, bandwidth):
    batch, event, latent = args.batch, args.event, args.latent
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (torch.randn(shape, device="cuda", generator=generator) * scale).to(dtype)

    x = tensor(batch, event)
    leaves = [tensor(batch, event), tensor(batch, event, scale=0.5), tensor(batch, latent),
              tensor(batch, latent, scale=0.5)]
    for leaf in leaves:
        leaf.requires_grad_()
    bytes_moved = x.numel() * x.element_size() + 2 * sum(t.numel() * t.element_size()
                                                         for t in leaves)

    implementations = {f"fastvae-{name}": fused_loss(name) for name in cuda_backends()}
    implementations["pytorch"] = plain_loss
    implementations["torch.compile"] = torch.compile(plain_loss)
    rows = []
    for name, loss_fn in implementations.items():
        def step():
            loss = loss_fn(x, *leaves)
            torch.autograd.grad(loss, leaves)
        rows.append(row("elbo fwd+bwd", name, dtype, time_ms(step, args.warmup, args.repeats),
                        bytes_moved, bandwidth))
    return rows


def sample_rows(args, dtype, bandwidth):
    mu = torch.randn(args.batch, args.latent, device="cuda").to(dtype).requires_grad_()
    logvar = (0.5 * torch.randn(args.batch, args.latent, device="cuda")).to(dtype).requires_grad_()
    upstream = torch.randn_like(mu)
    # reads mu, logvar, upstream; writes z, grad_mu, grad_logvar
    bytes_moved = 6 * mu.numel() * mu.element_size()
    implementations = {f"fastvae-{name}": fused_sample(name) for name in cuda_backends()}
    implementations["pytorch"] = plain_sample
    implementations["torch.compile"] = torch.compile(plain_sample)
    rows = []
    for name, sample_fn in implementations.items():
        def step():
            torch.autograd.grad(sample_fn(mu, logvar), (mu, logvar), upstream)
        rows.append(row("sample fwd+bwd", name, dtype, time_ms(step, args.warmup, args.repeats),
                        bytes_moved, bandwidth))
    return rows


def row(pass_name, implementation, dtype, ms, bytes_moved, bandwidth):
    bound_ms = bytes_moved / bandwidth
    return {"pass": pass_name, "implementation": implementation, "dtype": str(dtype),
            "ms": ms, "bound_ms": bound_ms, "multiple_of_bound": ms / bound_ms}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--event", type=int, default=3072)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated: " + ", ".join(DTYPES))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.triton_gpu needs a CUDA GPU: torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}). Run it on a machine with CUDA and Triton.")
    if "triton" not in cuda_backends():
        sys.exit("bench.triton_gpu: fastvae's Triton backend is not available on CUDA here "
                 f"({_backends._load_errors.get('triton') or 'unknown reason'}).")

    bandwidth = copy_bandwidth(args.warmup, args.repeats)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e6:.0f} GB/s; "
          f"B={args.batch} D={args.event} d={args.latent}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name.strip()]
        rows += loss_rows(args, dtype, bandwidth) + sample_rows(args, dtype, bandwidth)
    print(f"{'pass':<16}{'implementation':<18}{'dtype':<16}{'ms':>10}{'bound ms':>10}"
          f"{'x bound':>9}")
    for r in rows:
        print(f"{r['pass']:<16}{r['implementation']:<18}{r['dtype']:<16}{r['ms']:>10.3f}"
              f"{r['bound_ms']:>10.3f}{r['multiple_of_bound']:>9.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args),
                       "copy_bandwidth_bytes_per_ms": bandwidth, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
