"""The categorical likelihood (``python -m bench.categorical``): forward+backward of
``elbo_loss(likelihood='categorical')`` on 256-level images (32×32×3, D = 3072, K = 256,
float32 logits, uint8 targets, d = 64 latents) for every fastvae backend but the reference,
against the same loss in plain PyTorch (``F.cross_entropy(reduction='none')`` summed over the
image, plus the analytic KL) and torch.compile of it; with the bound (logits read once and
their gradient written once, over the copy bandwidth), the peak memory and the bytes kept for
backward. Both logit layouts: class-second ``[B, K, 3, 32, 32]`` (F.cross_entropy's) and
classes-last ``[B, 3, 32, 32, K]``.
"""
import argparse

import torch
import torch.nn.functional as F

import fastvae

from . import measure, report
from .implementations import fastvae_backends

IMAGE = (3, 32, 32)
LAYOUTS = {"second": 1, "last": -1}  # layout -> class_dim


def make_inputs(batch, classes, latent, layout, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, classes, *IMAGE) if layout == "second" else (batch, *IMAGE, classes)
    logits = torch.randn(shape, generator=g, device=device).requires_grad_()
    return {"x": torch.randint(0, classes, (batch, *IMAGE), generator=g, device=device,
                               dtype=torch.uint8),
            "x_hat": logits, "class_dim": LAYOUTS[layout], "z": None, "grad_z": None,
            "mu": torch.randn(batch, latent, generator=g, device=device).requires_grad_(),
            "logvar": (0.3 * torch.randn(batch, latent, generator=g, device=device)
                       ).requires_grad_()}


def plain_loss(target, logits, mu, logvar, class_dim):
    """The categorical −ELBO as usually written, nats per image."""
    if class_dim == -1:
        logits = logits.movedim(-1, 1)
    nll = F.cross_entropy(logits, target.long(), reduction="none").flatten(1).sum(-1)
    kl = 0.5 * (mu * mu + torch.exp(logvar) - 1 - logvar).sum(-1)
    return (nll + kl).mean()


def implementations(device):
    def fused(backend):
        def run(inputs):
            with fastvae.use_backend(backend):
                return fastvae.elbo_loss(inputs["x"], inputs["x_hat"], inputs["mu"],
                                         inputs["logvar"], likelihood="categorical",
                                         class_dim=inputs["class_dim"]), None
        return run

    def plain(function):
        return lambda inputs: (function(inputs["x"], inputs["x_hat"], inputs["mu"],
                                        inputs["logvar"], inputs["class_dim"]), None)

    # The reference backend is the tests' oracle, plain PyTorch with more temporaries.
    runs = {f"fastvae-{name}": fused(name) for name in fastvae_backends(device)
            if name != "reference"}
    runs["plain"] = plain(plain_loss)
    runs["torch.compile"] = plain(torch.compile(plain_loss))
    return runs


def bound_bytes(batch, classes, latent):
    """Bytes of one forward+backward at the memory bound: the float32 logits read once and
    their gradient written once, the uint8 targets read, mu and logvar read and their
    gradients written."""
    features = batch * 3 * 32 * 32
    return 8 * features * classes + features + 16 * batch * latent


def speed_rows(batches, layouts, classes, latent, device, copy_gbps):
    rows = []
    clock = measure.Clock(device)
    for layout in layouts:
        for batch in batches:
            bound_ms = bound_bytes(batch, classes, latent) / (copy_gbps * 1e6)
            inputs = make_inputs(batch, classes, latent, layout, device)
            for name, run in report.progress(list(implementations(device).items()),
                                             f"categorical {layout} B={batch}"):
                measure.first_call_ms(run, inputs, clock)  # compiles / warms up
                times = measure.time_phases(run, inputs, clock, min_reps=5)
                median = measure.summarise(times["forward+backward"])["median_ms"]
                rows.append({"layout": layout, "batch": batch, "classes": classes,
                             "implementation": name, "fwd_bwd_ms": median, "bound_ms": bound_ms,
                             "x_bound": median / bound_ms,
                             "peak_mib": _mib(measure.peak_memory_bytes(run, inputs, clock)),
                             "saved_mib": _mib(measure.saved_for_backward_bytes(run, inputs)[1])})
            del inputs
    return rows


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--classes", type=int, default=256)
    parser.add_argument("--latent", type=int, default=64)
    args = parser.parse_args(argv)

    env = report.environment(args.device)
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, device {env['device']}")
    copy_gbps = measure.copy_bandwidth_gbps(args.device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s")
    rows = speed_rows(args.batch, args.layout, args.classes, args.latent, args.device,
                      copy_gbps)
    report.print_table("categorical ELBO, 32x32x3 images, float32 logits: forward+backward", [
        ("layout", "layout", "s"), ("B", "batch", "d"), ("K", "classes", "d"),
        ("implementation", "implementation", "s"), ("ms", "fwd_bwd_ms", ".1f"),
        ("bound ms", "bound_ms", ".1f"), ("x bound", "x_bound", ".2f"),
        ("peak MiB", "peak_mib", ".0f"), ("kept MiB", "saved_mib", ".0f")], rows)
    report.write_csv([{**env, **row} for row in rows], report.RESULTS_DIR / "categorical.csv")


if __name__ == "__main__":
    main()
