"""The benchmarked workload: reparameterised sampling plus the −ELBO of one batch, with the
decoder left out (``x_hat`` and ``x_logvar`` are leaves that require grad), or either part
alone, and its byte count.
"""
import itertools
from dataclasses import dataclass

import torch

DECODERS = ("sigma", "x_logvar", "bernoulli")  # fixed σ, per-element log-variance, Bernoulli
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIXED_SIGMA = 0.5

# 'both': sampling + loss, the CPU benchmark's workload; 'elbo' / 'sample': one part alone, the
# GPU benchmark's, where each is a few kernel launches and host overhead shows per part.
PARTS = ("both", "elbo", "sample")

FULL_BATCHES = (256, 1024, 4096, 16384, 65536)
FULL_EVENTS = (784, 3072, 12288)
FULL_LATENTS = (32, 64, 128)


@dataclass(frozen=True)
class Case:
    batch: int      # B, datapoints
    event: int      # D, pixels per datapoint
    latent: int     # d, latent dims
    decoder: str    # one of DECODERS
    dtype: str      # key of DTYPES

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def element_size(self):
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self):
        return f"B={self.batch} D={self.event} d={self.latent} {self.decoder} {self.dtype}"

    def series(self):
        """Everything but the batch size: the cases that share one plot."""
        return f"{self.dtype}_{self.decoder}_D{self.event}_d{self.latent}"

    def read_bytes(self):
        """What any loss forward pass must read once: x, x_hat (and x_logvar when it is
        per-element), mu, logvar."""
        decoder_tensors = 3 if self.decoder == "x_logvar" else 2
        return self.element_size * (decoder_tensors * self.batch * self.event
                                    + 2 * self.batch * self.latent)

    def write_bytes(self):
        """What any loss backward pass must write once: the gradients of x_hat (and x_logvar),
        mu and logvar (x is data and needs none)."""
        decoder_grads = 2 if self.decoder == "x_logvar" else 1
        return self.element_size * (decoder_grads * self.batch * self.event
                                    + 2 * self.batch * self.latent)

    def bound_bytes(self, phase, part="both"):
        """Bytes behind the bandwidth bound of ``phase`` (forward+backward = both phases' sum).
        'both' and 'elbo' (docs/design.md): forward = the loss's reads, backward = its gradient
        writes; z and grad_z (B×d) are left out. 'sample': forward reads mu, logvar and writes
        z; backward reads grad_z and writes the gradients of mu and logvar."""
        if part == "sample":
            forward = backward = 3 * self.element_size * self.batch * self.latent
        else:
            forward, backward = self.read_bytes(), self.write_bytes()
        return {"forward": forward, "backward": backward,
                "forward+backward": forward + backward}[phase]

    def batch_by_event_bytes(self):
        return self.batch * self.event * self.element_size


def default_cases():
    """About a minute on a 2-core machine: a batch sweep of the design's case (B=4096, D=3072,
    d=64, per-element decoder log-variance), plus the other decoders and bfloat16 at B=4096."""
    cases = [Case(batch, 3072, 64, "x_logvar", "float32") for batch in (256, 1024, 4096)]
    cases += [Case(4096, 3072, 64, decoder, "float32") for decoder in ("sigma", "bernoulli")]
    cases.append(Case(4096, 3072, 64, "x_logvar", "bfloat16"))
    return cases


def gpu_cases():
    """The default on CUDA: the design's case in float32 and bfloat16, and a large one."""
    return [Case(4096, 3072, 64, "x_logvar", "float32"),
            Case(4096, 3072, 64, "x_logvar", "bfloat16"),
            Case(16384, 12288, 256, "x_logvar", "float32")]


def sweep_cases(batches=FULL_BATCHES, events=FULL_EVENTS, latents=FULL_LATENTS,
                decoders=DECODERS, dtypes=tuple(DTYPES)):
    return [Case(*values) for values in itertools.product(batches, events, latents, decoders,
                                                           dtypes)]


def make_inputs(case, device, seed=0):
    """Leaves for one case: x (data, no grad), x_hat / x_logvar / mu / logvar requiring grad,
    the upstream gradient of z a decoder would send back, and the fixed σ for 'sigma'."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def uniform(rows, cols, low, high, requires_grad=False):
        values = torch.rand(rows, cols, generator=generator, device=device) * (high - low) + low
        return values.to(dtype).requires_grad_(requires_grad)

    b, D, d = case.batch, case.event, case.latent
    if case.decoder == "bernoulli":
        # Binary pixels, so torch.distributions' default argument validation accepts them.
        x = (torch.rand(b, D, generator=generator, device=device) < 0.3).to(dtype)
        x_hat = uniform(b, D, -3.0, 3.0, requires_grad=True)  # logits
    else:
        x = uniform(b, D, 0.0, 1.0)
        x_hat = uniform(b, D, 0.0, 1.0, requires_grad=True)
    return {
        "x": x,
        "x_hat": x_hat,
        "x_logvar": (uniform(b, D, -2.0, 1.0, requires_grad=True)
                     if case.decoder == "x_logvar" else None),
        "sigma": FIXED_SIGMA if case.decoder == "sigma" else None,
        "likelihood": "bernoulli" if case.decoder == "bernoulli" else "gaussian",
        "mu": uniform(b, d, -1.0, 1.0, requires_grad=True),
        "logvar": uniform(b, d, -2.0, 0.5, requires_grad=True),
        "grad_z": uniform(b, d, -1.0, 1.0),
    }


def leaves(inputs):
    """The inputs whose gradients a backward pass produces."""
    return [inputs[key] for key in ("x_hat", "x_logvar", "z", "mu", "logvar")
            if inputs.get(key) is not None]
