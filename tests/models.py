"""A small VAE whose training step uses every public function of fastvae, for the compile and
determinism tests. Build it inside the ``backend`` fixture: its parameters and data land on
the test device."""
import torch
from torch import nn

import fastvae
from cases import TEST_DEVICE, generator

BATCH, FEATURES, LATENT, SAMPLES = 4, 6, 3, 2


class EveryFunctionVAE(nn.Module):
    """Linear encoder/decoder, a learnable diagonal prior, and a loss that sums every public
    function of fastvae in every form (so a compiled step covers them all)."""

    def __init__(self):
        super().__init__()
        features, latent = FEATURES, LATENT
        self.encoder = nn.Linear(features, 2 * latent)
        self.decoder = nn.Linear(latent, 2 * features)
        self.prior_mu = nn.Parameter(0.1 * torch.randn(latent))
        self.prior_logvar = nn.Parameter(0.1 * torch.randn(latent))
        self.log_sigma = nn.Parameter(torch.full((features,), -0.2))   # sigma as a tensor
        self.event_logvar = nn.Parameter(torch.zeros(features))        # x_logvar of shape [D]
        self.scalar_logvar = nn.Parameter(torch.tensor(0.3))           # 0-dim x_logvar
        self.criterion = fastvae.ELBOLoss(sigma=0.8, free_bits=0.01, reduction="sum")

    def forward(self, x, x_binary, beta):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(mu, logvar, SAMPLES)                 # [S, B, d]
        x_hat, x_logvar = self.decoder(z).chunk(2, dim=-1)              # [S, B, D] each
        terms = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, beta=beta,
                                  free_bits=0.05, prior_mu=self.prior_mu,
                                  prior_logvar=self.prior_logvar, return_terms=True)
        one_sample = fastvae.elbo_loss(x, x_hat[0], mu, logvar, sigma=0.5, reduction="sum")
        bernoulli = fastvae.elbo_loss(x_binary, x_hat, mu, logvar, likelihood="bernoulli",
                                      beta=beta, reduction="none")
        laplace = fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="laplace",
                                    x_logscale=0.5 * x_logvar, beta=beta, reduction="none")
        kl = fastvae.gaussian_kl(mu, logvar, self.prior_mu, self.prior_logvar)
        nll_event = fastvae.gaussian_nll(x, x_hat, self.event_logvar, reduction="mean")
        nll_scalar = fastvae.gaussian_nll(x, x_hat[1], self.scalar_logvar)
        nll_sigma = fastvae.gaussian_nll(x, x_hat, sigma=self.log_sigma.exp(), reduction="sum")
        nll_bernoulli = fastvae.bernoulli_nll(x_binary, x_hat[0], reduction="sum")
        nll_laplace = fastvae.laplace_nll(x, x_hat, scale=self.log_sigma.exp(), reduction="mean")
        module = self.criterion(x, x_hat, mu, logvar)
        weights = torch.linspace(0.5, 1.5, x.shape[0], device=x.device)
        total = (terms.loss + 0.1 * one_sample + 0.1 * (weights * bernoulli).sum() + kl.mean()
                 + 0.1 * (weights * laplace).sum() + nll_event
                 + 0.1 * (weights * nll_scalar).sum() + 0.01 * nll_sigma
                 + 0.1 * nll_bernoulli + 0.1 * nll_laplace + 0.01 * module)
        return total, terms.nll, terms.kl


def batch():
    """Data x and binary data, on the test device."""
    g = generator(3)
    x = torch.randn(BATCH, FEATURES, generator=g, device=TEST_DEVICE)
    return x, torch.rand(BATCH, FEATURES, generator=g, device=TEST_DEVICE).round()


def train(model, step_fn, x, x_binary, betas):
    """SGD steps with the noise seeded per step; the outputs and gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for i, beta in enumerate(betas):
        torch.manual_seed(100 + i)  # the seed reparameterize draws (every device's generator)
        optimizer.zero_grad(set_to_none=True)
        outputs = step_fn(x, x_binary, beta)
        outputs[0].backward()
        history.append(([o.detach() for o in outputs],
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history
