"""Side-by-side timing of the native CPU backend against plain PyTorch, torch.compile of it, and
the memory-bandwidth bound (DESIGN.md §5), in one process.

Workload: forward + backward of ``fastvae.reparameterize`` + ``fastvae.elbo_loss`` (Gaussian,
per-element decoder log-variance), float32. No decoder: x_hat and x_logvar are leaves, and z
reaches the loss through ``z.sum()`` so mu and logvar also get the reparameterisation gradient.

    python bench/native_perf.py                       # B=4096, d=64, D=3072
    python bench/native_perf.py --batch 256 1024 65536
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/native_perf.py
"""
import argparse
import math
import os
import statistics
import time

import torch

import fastvae

LOG_2PI = math.log(2.0 * math.pi)


def plain_step(x, x_hat, x_logvar, mu, logvar):
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    nll = 0.5 * ((x - x_hat) ** 2 * torch.exp(-x_logvar) + x_logvar + LOG_2PI).sum(1)
    kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1)
    return (nll + kl).mean() + z.sum()


def fastvae_step(x, x_hat, x_logvar, mu, logvar):
    z = fastvae.reparameterize(mu, logvar)
    return fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar) + z.sum()


def median_ms(run, repeats):
    return timings_ms(run, repeats)[0]


def timings_ms(run, repeats):
    """Median and minimum over `repeats` runs after a warm-up (and compilation) run."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def copy_bandwidth(nbytes, repeats):
    """Bytes per second of a large out-of-cache copy (read + write counted)."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (ms * 1e-3)


def bench(batch, latent, features, repeats, with_compile):
    torch.manual_seed(0)
    x = torch.randn(batch, features)
    leaves = [torch.randn(batch, features).requires_grad_(),
              (0.5 * torch.randn(batch, features)).requires_grad_(),
              torch.randn(batch, latent).requires_grad_(),
              (0.5 * torch.randn(batch, latent)).requires_grad_()]

    def runner(step):
        def run():
            for leaf in leaves:
                leaf.grad = None
            step(x, *leaves).backward()
        return run

    results = {"plain PyTorch": timings_ms(runner(plain_step), max(3, repeats // 4))}
    if with_compile:
        results["torch.compile"] = timings_ms(runner(torch.compile(plain_step)), repeats)
    with fastvae.use_backend("native"):
        results["fastvae native"] = timings_ms(runner(fastvae_step), repeats)

    element = 4
    read = (3 * batch * features + 2 * batch * latent) * element
    written = (2 * batch * features + 2 * batch * latent) * element
    bandwidth = copy_bandwidth(max(read // 3, 1 << 26), repeats)
    bound_ms = (read + written) / bandwidth * 1e3
    print(f"B={batch} d={latent} D={features} threads={torch.get_num_threads()} "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '-'}")
    print(f"  bandwidth bound: {bound_ms:8.2f} ms  (copy {bandwidth / 1e9:.1f} GB/s)")
    plain = results["plain PyTorch"][0]
    print("  median ms (min ms); multiple of the bound and speed-up over plain use medians")
    for name, (ms, fastest) in results.items():
        print(f"  {name:16s} {ms:8.2f} ms ({fastest:7.2f})  {ms / bound_ms:6.2f}x bound  "
              f"{plain / ms:6.1f}x faster than plain")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4096])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--features", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for batch in args.batch:
        bench(batch, args.latent, args.features, args.repeats, not args.no_compile)


if __name__ == "__main__":
    main()
