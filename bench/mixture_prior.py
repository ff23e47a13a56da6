"""Digits with a learned prior (``python -m bench.mixture_prior``): examples/train_digits.py's
Bernoulli VAE trained with the ELBO from the same initialisation under the standard normal
prior and under a learned 10-component mixture-of-Gaussians prior (means, log-variances and
weights trained with the model). Reports the held-out −ELBO (one fixed-seed sample) and the
held-out log p(x) estimated with ``fastvae.log_likelihood`` (S = 5000).
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import fastvae

from . import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_digits  # noqa: E402  (examples/ is not a package)

EVAL_SEED = 1234


class MixturePrior(nn.Module):
    """K learned components; initialised spread around the origin so they can separate."""

    def __init__(self, components=10, latent=8):
        super().__init__()
        self.means = nn.Parameter(torch.randn(components, latent))
        self.logvars = nn.Parameter(torch.zeros(components, latent))
        self.logits = nn.Parameter(torch.zeros(components))

    def forward(self):
        return fastvae.GaussianMixture(self.means, self.logvars, self.logits)


def negative_elbo(model, prior, x, seed=None):
    """−ELBO in nats per datapoint: the fused Bernoulli NLL plus the KL to the prior (analytic
    for the standard normal, the sample-based estimate for the mixture)."""
    mu, logvar = model.encode(x)
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    nll = fastvae.bernoulli_nll(x, model.decode(z), reduction="mean")
    if prior is None:
        return nll + fastvae.gaussian_kl(mu, logvar).mean()
    return nll + fastvae.mixture_kl(z, mu, logvar, prior()).mean()


def train(model, prior, train_x, epochs, batch_size=64, lr=2e-3):
    parameters = list(model.parameters()) + ([] if prior is None else list(prior.parameters()))
    optimiser = torch.optim.Adam(parameters, lr=lr)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=shuffle).split(batch_size):
            loss = negative_elbo(model, prior, train_x[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()


@torch.no_grad()
def evaluate(model, prior, x, eval_samples):
    mu, logvar = model.encode(x)
    options = {} if prior is None else {"prior": prior()}
    log_px = fastvae.log_likelihood(x, mu, logvar, model.decode, n_samples=eval_samples,
                                    likelihood="bernoulli",
                                    generator=torch.Generator().manual_seed(2), **options)
    return negative_elbo(model, prior, x, seed=EVAL_SEED).item(), log_px.mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=5000)
    args = parser.parse_args(argv)
    env = report.environment("cpu")
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}")
    train_x, held_out_x = train_digits.load_digits_split(seed=0)
    torch.manual_seed(0)
    initial_state = train_digits.DigitsVAE("bernoulli").state_dict()
    rows = []
    for name, components in (("standard normal", None), (f"mixture K={args.components}",
                                                         args.components)):
        model = train_digits.DigitsVAE("bernoulli")
        model.load_state_dict(initial_state)
        torch.manual_seed(1)
        prior = None if components is None else MixturePrior(components)
        train(model, prior, train_x, args.epochs)
        neg_elbo, log_px = evaluate(model, prior, held_out_x, args.eval_samples)
        rows.append({"prior": name, "epochs": args.epochs, "held_out_neg_elbo": neg_elbo,
                     "held_out_log_px": log_px, "eval_samples": args.eval_samples})
    report.print_table("digits, Bernoulli decoder, ELBO training from one initialisation: "
                       "held-out (360 images)", [
                           ("prior", "prior", "s"), ("epochs", "epochs", "d"),
                           ("-ELBO", "held_out_neg_elbo", ".2f"),
                           ("log p(x)", "held_out_log_px", ".2f"),
                           ("S eval", "eval_samples", "d")], rows)
    report.write_csv([{**env, **row} for row in rows], report.RESULTS_DIR / "mixture_prior.csv")


if __name__ == "__main__":
    main()
