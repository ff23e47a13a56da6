"""Train a small MLP VAE on scikit-learn's bundled 8x8 digits with fastvae's loss.

    python examples/train_digits.py --epochs 30 --backend auto

The data ship with scikit-learn (1797 images, 64 pixels scaled to [0, 1]), so nothing is
downloaded. Prints the held-out negative ELBO in nats per datapoint as it trains.

Importable: ``bench/`` reuses ``load_digits_split``, ``DigitsVAE``, ``train`` and the two loss
functions to compare fastvae's loss with a ``torch.distributions`` one from the same start.
"""
import argparse
import time

import torch
from torch import nn

import fastvae

# Some pixels are 0 in every training image; a learned per-pixel variance would shrink to 0
# there and the Gaussian likelihood would grow without bound, so the log-variance has a floor.
MIN_X_LOGVAR = -4.0
EVAL_SEED = 1234  # the same noise for every held-out evaluation, so curves are comparable


def load_digits_split(seed=0, held_out_fraction=0.2):
    """(train, held_out) float32 tensors [N, 64] in [0, 1], split reproducibly by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels = load_digits().data.astype("float32") / 16.0
    train, held_out = train_test_split(pixels, test_size=held_out_fraction, random_state=seed)
    return torch.from_numpy(train), torch.from_numpy(held_out)


class DigitsVAE(nn.Module):
    """64 → hidden → latent (μ, log σ²) → hidden → 64, with a Gaussian decoder with a learned
    per-pixel log-variance, or a Bernoulli decoder (the output is then logits)."""

    def __init__(self, likelihood="gaussian", n_pixels=64, hidden=128, latent=8):
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"likelihood must be 'gaussian' or 'bernoulli', got {likelihood!r}")
        self.likelihood = likelihood
        self.encoder = nn.Sequential(nn.Linear(n_pixels, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, n_pixels))
        self.raw_x_logvar = (nn.Parameter(torch.zeros(n_pixels)) if likelihood == "gaussian"
                             else None)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        return self.decoder(z)

    def x_logvar(self):
        """The decoder's per-pixel log-variance, or None for the Bernoulli decoder."""
        if self.raw_x_logvar is None:
            return None
        return self.raw_x_logvar.clamp(min=MIN_X_LOGVAR)


def fastvae_negative_elbo(model, x, seed=None):
    """−ELBO in nats per datapoint with fastvae's fused sampling and loss."""
    mu, logvar = model.encode(x)
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    return fastvae.elbo_loss(x, model.decode(z), mu, logvar, likelihood=model.likelihood,
                             x_logvar=model.x_logvar())


def distributions_negative_elbo(model, x):
    """The same −ELBO written with ``torch.distributions``, as a baseline."""
    from torch.distributions import Bernoulli, Normal, kl_divergence

    mu, logvar = model.encode(x)
    posterior = Normal(mu, (0.5 * logvar).exp())
    x_hat = model.decode(posterior.rsample())
    if model.likelihood == "gaussian":
        decoder = Normal(x_hat, (0.5 * model.x_logvar()).exp())
    else:
        # Grey levels in [0, 1] are outside Bernoulli's {0, 1} support; the density is still
        # the usual cross-entropy, so argument validation is switched off for it.
        decoder = Bernoulli(logits=x_hat, validate_args=False)
    nll = -decoder.log_prob(x).sum(-1)
    kl = kl_divergence(posterior, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    return (nll + kl).mean()


@torch.no_grad()
def held_out_negative_elbo(model, x):
    """Held-out −ELBO in nats per datapoint (one fixed-seed sample of z), the same evaluator
    whichever loss trained the model."""
    model.eval()
    loss = fastvae_negative_elbo(model, x, seed=EVAL_SEED).item()
    model.train()
    return loss


def train(model, train_x, held_out_x, loss_fn=fastvae_negative_elbo, epochs=30, batch_size=64,
          lr=2e-3, seed=0, log_every=5, progress=True):
    """Train with Adam; returns a dict with the final held-out −ELBO, the per-epoch history,
    the optimiser steps taken and the wall time of the training steps alone (no evaluation)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    history, steps, train_seconds = [], 0, 0.0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for batch in torch.randperm(len(train_x), generator=shuffle).split(batch_size):
            loss = loss_fn(model, train_x[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
        train_seconds += time.perf_counter() - started
        history.append(held_out_negative_elbo(model, held_out_x))
        if progress and (epoch % log_every == 0 or epoch == epochs):
            print(f"epoch {epoch:3d}  held-out -ELBO {history[-1]:8.3f} nats/datapoint",
                  flush=True)
    return {"held_out_neg_elbo": history[-1], "history": history, "steps": steps,
            "train_seconds": train_seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "native", "reference", "triton"],
                        help="fastvae backend (default: auto)")
    parser.add_argument("--likelihood", default="gaussian", choices=["gaussian", "bernoulli"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    fastvae.set_backend(args.backend)
    torch.manual_seed(args.seed)
    train_x, held_out_x = load_digits_split(args.seed)
    model = DigitsVAE(args.likelihood)
    print(f"digits: {len(train_x)} train / {len(held_out_x)} held-out images of 64 pixels; "
          f"{args.likelihood} decoder; fastvae backend {args.backend!r} "
          f"(available: {', '.join(fastvae.available_backends())})")
    print(f"held-out -ELBO before training {held_out_negative_elbo(model, held_out_x):8.3f} "
          "nats/datapoint")
    result = train(model, train_x, held_out_x, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed)
    print(f"final held-out -ELBO {result['held_out_neg_elbo']:.3f} nats/datapoint after "
          f"{result['steps']} steps ({result['steps'] / result['train_seconds']:.0f} steps/s)")


if __name__ == "__main__":
    main()
