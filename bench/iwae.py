"""The importance-weighted bound (``python -m bench.iwae``).

1. speed and memory: forward+backward of the bound over given decoder outputs (Bernoulli
   logits ``[S, B, D]``) and samples, at S = 5 and S = 50, for every fastvae backend, the plain
   PyTorch IWAE people write (x expanded S times, BCE, two Gaussian log-densities, logsumexp)
   and torch.compile of it; with the bound (bytes read and written once / copy bandwidth),
   the peak memory and the bytes kept for backward.
2. digits: the same VAE trained from the same initialisation with the ELBO, the IWAE bound
   (S = 5) and its DReG gradient; held-out −ELBO and held-out log p(x) estimated with
   ``fastvae.log_likelihood`` (S = 5000).
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fastvae

from . import measure, report
from .implementations import fastvae_backends

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_digits  # noqa: E402  (examples/ is not a package)


def make_inputs(samples, batch, event, latent, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).requires_grad_()

    mu, logvar = leaf(batch, latent), leaf(batch, latent, scale=0.3)
    z = (mu.detach() + torch.randn(samples, batch, latent, generator=g, device=device)
         ).requires_grad_()
    return {"x": (torch.rand(batch, event, generator=g, device=device) < 0.3).float(),
            "x_hat": leaf(samples, batch, event, scale=2.0), "x_logvar": None, "z": z,
            "mu": mu, "logvar": logvar, "grad_z": None}


def plain_bound(x, x_hat, z, mu, logvar):
    """The IWAE loss as usually written: every term materialised over [S, B, ...]."""
    nll = F.binary_cross_entropy_with_logits(x_hat, x.expand_as(x_hat), reduction="none").sum(-1)
    log_pz = -0.5 * (z * z).sum(-1)
    log_qz = -0.5 * (logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)
    log_w = log_pz - log_qz - nll
    return (math.log(x_hat.shape[0]) - torch.logsumexp(log_w, 0)).mean()


def implementations(device):
    def fused(backend):
        def run(inputs):
            with fastvae.use_backend(backend):
                return fastvae.iwae_loss(inputs["x"], inputs["x_hat"], inputs["z"], inputs["mu"],
                                         inputs["logvar"], likelihood="bernoulli"), None
        return run

    def plain(function):
        return lambda inputs: (function(inputs["x"], inputs["x_hat"], inputs["z"], inputs["mu"],
                                        inputs["logvar"]), None)

    runs = {f"fastvae-{name}": fused(name) for name in fastvae_backends(device)}
    runs["plain"] = plain(plain_bound)
    runs["torch.compile"] = plain(torch.compile(plain_bound))
    return runs


def bound_bytes(samples, batch, event, latent):
    """float32 bytes of one forward+backward at the memory bound: x, x_hat, z, mu, logvar read
    once; the gradients of x_hat, z, mu and logvar written once."""
    read = batch * event + samples * batch * (event + latent) + 2 * batch * latent
    written = samples * batch * (event + latent) + 2 * batch * latent
    return 4 * (read + written)


def speed_rows(shapes, device, copy_gbps):
    rows = []
    clock = measure.Clock(device)
    for samples, batch, event, latent in shapes:
        bound_ms = bound_bytes(samples, batch, event, latent) / (copy_gbps * 1e6)
        inputs = make_inputs(samples, batch, event, latent, device)
        for name, run in report.progress(list(implementations(device).items()),
                                         f"iwae S={samples}"):
            measure.first_call_ms(run, inputs, clock)  # compiles / warms up
            times = measure.time_phases(run, inputs, clock)["forward+backward"]
            median = measure.summarise(times)["median_ms"]
            rows.append({"samples": samples, "batch": batch, "event": event, "latent": latent,
                         "implementation": name, "fwd_bwd_ms": median, "bound_ms": bound_ms,
                         "x_bound": median / bound_ms,
                         "peak_mib": _mib(measure.peak_memory_bytes(run, inputs, clock)),
                         "saved_mib": _mib(measure.saved_for_backward_bytes(run, inputs)[1])})
    return rows


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def _iwae_loss(samples, estimator):
    def loss(model, x):
        mu, logvar = model.encode(x)
        z = fastvae.reparameterize(mu, logvar, n_samples=samples)
        decoder_input, tie = fastvae.dreg(z) if estimator == "dreg" else (z, None)
        return fastvae.iwae_loss(x, model.decode(decoder_input), z, mu, logvar,
                                 likelihood=model.likelihood, dreg=tie)
    return loss


def digits_rows(epochs, samples, eval_samples):
    train_x, held_out_x = train_digits.load_digits_split(seed=0)
    torch.manual_seed(0)
    initial_state = train_digits.DigitsVAE("bernoulli").state_dict()
    runs = [("elbo", train_digits.fastvae_negative_elbo),
            (f"iwae S={samples}", _iwae_loss(samples, "iwae")),
            (f"iwae-dreg S={samples}", _iwae_loss(samples, "dreg"))]
    rows = []
    for name, loss_fn in report.progress(runs, "digits training"):
        model = train_digits.DigitsVAE("bernoulli")
        model.load_state_dict(initial_state)
        torch.manual_seed(1)
        result = train_digits.train(model, train_x, held_out_x, loss_fn=loss_fn, epochs=epochs,
                                    progress=False)
        mu, logvar = model.encode(held_out_x)
        log_px = fastvae.log_likelihood(held_out_x, mu, logvar, model.decode,
                                        n_samples=eval_samples, likelihood="bernoulli",
                                        generator=torch.Generator().manual_seed(2))
        rows.append({"objective": name, "epochs": epochs, "steps": result["steps"],
                     "held_out_neg_elbo": result["held_out_neg_elbo"],
                     "held_out_log_px": log_px.mean().item(), "eval_samples": eval_samples})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--event", type=int, default=784)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args(argv)

    env = report.environment(args.device)
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, device {env['device']}")
    copy_gbps = measure.copy_bandwidth_gbps(args.device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s")
    shapes = [(s, args.batch, args.event, args.latent) for s in args.samples]
    rows = speed_rows(shapes, args.device, copy_gbps)
    report.print_table("importance-weighted bound, Bernoulli, float32: forward+backward", [
        ("S", "samples", "d"), ("B", "batch", "d"), ("D", "event", "d"),
        ("implementation", "implementation", "s"), ("ms", "fwd_bwd_ms", ".3f"),
        ("bound ms", "bound_ms", ".3f"), ("x bound", "x_bound", ".2f"),
        ("peak MiB", "peak_mib", ".1f"), ("kept MiB", "saved_mib", ".1f")], rows)
    report.write_csv([{**env, **row} for row in rows], report.RESULTS_DIR / "iwae_speed.csv")
    if args.skip_digits:
        return
    digits = digits_rows(args.epochs, 5, args.eval_samples)
    report.print_table("digits, Bernoulli decoder, same initialisation: held-out (360 images)", [
        ("objective", "objective", "s"), ("epochs", "epochs", "d"),
        ("-ELBO", "held_out_neg_elbo", ".2f"), ("log p(x)", "held_out_log_px", ".2f"),
        ("S eval", "eval_samples", "d")], digits)
    report.write_csv([{**env, **row} for row in digits], report.RESULTS_DIR / "iwae_digits.csv")


if __name__ == "__main__":
    main()
