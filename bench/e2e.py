"""End-to-end training with fastvae's loss against the baselines (``python -m bench.e2e``).

1. digits: examples/train_digits.py's VAE trained from the same initialisation with each
   fastvae backend's loss and with a torch.distributions loss: steps/s and held-out −ELBO.
2. synthetic: one optimiser step of an MLP image VAE on a large batch (B=4096 images of
   3x32x32 by default, learned per-pixel decoder log-variance), where the loss is a real share
   of the step: step time per loss implementation, and the loss's share of it, taken against
   the same step with a trivial loss.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fastvae

from . import measure, report
from .implementations import (distributions_loss, distributions_sample, fastvae_backends,
                              fastvae_loss, fastvae_sample, plain_loss, plain_sample)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_digits  # noqa: E402  (examples/ is not a package)


DIGITS_BATCH = 64


def digits_rows(epochs, device, attempts, wait_idle):
    train_x, held_out_x = train_digits.load_digits_split(seed=0)
    torch.manual_seed(0)
    initial_state = train_digits.DigitsVAE().state_dict()
    runs = [(f"fastvae-{name}", name, train_digits.fastvae_negative_elbo)
            for name in fastvae_backends(device)]
    runs.append(("distributions", None, train_digits.distributions_negative_elbo))
    rows = []
    for name, backend, loss_fn in report.progress(runs, "digits training"):
        def train():
            model = train_digits.DigitsVAE()
            model.load_state_dict(initial_state)
            torch.manual_seed(1)  # the same noise draws for the torch.distributions run each time
            with fastvae.use_backend(backend or "auto"):
                return train_digits.train(model, train_x, held_out_x, loss_fn=loss_fn,
                                          epochs=epochs, batch_size=DIGITS_BATCH, progress=False)
        result, other_cores = measure.least_disturbed(train, attempts, wait_idle)
        rows.append({"workload": "digits", "implementation": name,
                     "batch": DIGITS_BATCH, "event": 64, "latent": 8, "epochs": epochs,
                     "steps": result["steps"],
                     "steps_per_s": result["steps"] / result["train_seconds"],
                     "step_ms": 1e3 * result["train_seconds"] / result["steps"],
                     "held_out_neg_elbo": result["held_out_neg_elbo"],
                     "other_cpu_cores": other_cores})
    return rows


class ImageVAE(nn.Module):
    """MLP VAE for flattened images, Gaussian decoder with a learned per-pixel log-variance."""

    def __init__(self, pixels, hidden, latent):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, pixels))
        self.x_logvar = nn.Parameter(torch.zeros(pixels))


def trivial_loss(x, x_hat, x_logvar, sigma, likelihood, mu, logvar):
    """Touches every output so the whole model is still differentiated, at almost no cost."""
    return x_hat.mean() + x_logvar.mean() + mu.mean() + logvar.mean()


def synthetic_step_ms(sample, loss, batch, pixels, hidden, latent, steps, device):
    """Median milliseconds of one Adam step (forward, loss, backward, update) on fixed data."""
    torch.manual_seed(0)
    model = ImageVAE(pixels, hidden, latent).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, pixels, device=device)
    clock_cuda = device.type == "cuda"
    times = []
    for step in range(steps + 2):  # two warm-up steps (compilation, allocator)
        if clock_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        x_hat = model.decoder(sample(mu, logvar))
        value = loss(x, x_hat, model.x_logvar, None, "gaussian", mu, logvar)
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        if clock_cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def synthetic_rows(batch, pixels, hidden, latent, steps, device, attempts, wait_idle):
    torch._dynamo.reset()
    runs = [(f"fastvae-{name}", fastvae_sample(name), fastvae_loss(name))
            for name in fastvae_backends(device)]
    runs += [("plain", plain_sample, plain_loss),
             ("distributions", distributions_sample, distributions_loss),
             ("compiled-plain", torch.compile(plain_sample), torch.compile(plain_loss)),
             ("trivial loss (model only)", plain_sample, trivial_loss)]
    step_ms, other_cores = {}, {}
    for name, sample, loss in report.progress(runs, "synthetic steps"):
        step_ms[name], other_cores[name] = measure.least_disturbed(
            lambda: synthetic_step_ms(sample, loss, batch, pixels, hidden, latent, steps, device),
            attempts, wait_idle)
    model_only = step_ms["trivial loss (model only)"]
    return [{"workload": "synthetic", "implementation": name, "batch": batch, "event": pixels,
             "latent": latent, "hidden": hidden, "steps": steps, "step_ms": ms,
             "steps_per_s": 1e3 / ms, "loss_share": max(0.0, 1 - model_only / ms),
             "other_cpu_cores": other_cores[name]} for name, ms in step_ms.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pixels", type=int, default=3072, help="D of the synthetic images")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's, one per core)")
    parser.add_argument("--attempts", type=int, default=measure.attempts_default(),
                        help="as for python -m bench")
    parser.add_argument("--wait-idle", type=float, default=measure.wait_idle_default(),
                        metavar="SECONDS", help="as for python -m bench")
    parser.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = report.environment(device)

    digits = (digits_rows(args.digits_epochs, device, args.attempts, args.wait_idle)
              if args.digits_epochs > 0 else [])
    synthetic = synthetic_rows(args.batch, args.pixels, args.hidden, args.latent, args.steps,
                               device, args.attempts, args.wait_idle)
    title = (f"on {env['device']} ({env['cpu']}, {env['cores']} cores, {env['torch_threads']} "
             f"torch threads), allocator "
             f"{env['allocator']}, torch {env['torch']}, {env['date']}")
    if digits:
        report.print_table(f"digits VAE, {args.digits_epochs} epochs from the same initialisation, "
                           + title,
                           [("loss", "implementation", "s"), ("steps/s", "steps_per_s", ".0f"),
                            ("ms/step", "step_ms", ".2f"),
                            ("held-out -ELBO (nats)", "held_out_neg_elbo", ".3f"),
                            ("others' cores", "other_cpu_cores", ".2f")], digits)
        report.warn_if_disturbed(digits, "digits runs")
    report.print_table(f"synthetic image VAE step, B={args.batch} D={args.pixels} hidden="
                       f"{args.hidden} d={args.latent}, median of {args.steps} steps, " + title,
                       [("loss", "implementation", "s"), ("ms/step", "step_ms", ".0f"),
                        ("steps/s", "steps_per_s", ".2f"), ("loss share", "loss_share", ".0%"),
                        ("others' cores", "other_cpu_cores", ".2f")],
                       synthetic)
    print("loss share = 1 - (step with a trivial loss) / (step with this loss); others' cores = "
          "CPU used by other processes meanwhile")
    report.warn_if_disturbed(synthetic, "synthetic runs")
    path = args.out_dir / f"e2e_{report.allocator_tag()}.csv"
    report.write_csv([{**env, **row} for row in digits + synthetic], path)
    print(f"\nCSV: {path}")


if __name__ == "__main__":
    main()
