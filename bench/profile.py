"""A short torch.profiler table of fastvae's fused loss (``python -m bench.profile``): a few
forward+backward steps of ``elbo_loss`` (``--part both`` adds ``reparameterize``) after
warm-up, on one backend, at the design's case by default (B=4096, D=3072, d=64, per-element
decoder log-variance, float32). Shows where a step's time goes: kernels against the host-side
ops around them."""
import argparse

import torch

import fastvae

from . import measure
from .implementations import Implementation, fastvae_elbo, workload
from .workloads import DTYPES, PARTS, Case, make_inputs


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="fastvae backend (default: auto)")
    parser.add_argument("--part", default="elbo", choices=PARTS)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--event", type=int, default=3072)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=15, help="table rows")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    inputs = make_inputs(Case(args.batch, args.event, args.latent, "x_logvar", args.dtype),
                         device)
    step = Implementation("fastvae", workload(fastvae.reparameterize, fastvae_elbo, args.part))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(steps):
        for _ in range(steps):
            measure.clear_gradients(inputs)
            measure.backward(*step(inputs), inputs["grad_z"])
        sync()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with fastvae.use_backend(args.backend):
        run(3)  # warm-up: compilation, autotuning, allocator
        with torch.profiler.profile(activities=activities) as profiler:
            run(args.steps)
    print(f"torch.profiler: {args.steps} forward+backward steps of {args.part} on {device} "
          f"(backend {args.backend!r}), B={args.batch} D={args.event} d={args.latent} "
          f"{args.dtype}")
    print(profiler.key_averages().table(
        sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
