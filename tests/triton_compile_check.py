"""Compile every Triton kernel launch of the backend for Ampere and Hopper, without a GPU.

Run as a script with the Triton interpreter off (``test_triton.py`` does): every kernel launch
the backend functions below make is replaced by compiling that kernel, with the arguments it
was given, to a cubin for sm_80 and sm_90 (Triton bundles ptxas, so no GPU is needed). This
catches what the interpreter cannot: type errors of the compiler, float64 maths lowering,
register-file limits of the tile shapes.

``--every-config``: for the first loss launch, compile every autotune candidate (run it with
``FASTVAE_AUTOTUNE=1`` so the kernels are wrapped in the autotuner); otherwise the first
candidate, or the heuristic's config.
"""
import argparse
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]


class Compiler:
    """Stands in for kernel launches: compiles each distinct specialisation once per target."""

    def __init__(self):
        self.compiled = set()
        self.every_config = False

    def compile_launch(self, fn, args, kwargs):
        for target in TARGETS:
            backend = make_backend(target)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                                  specialization, options)
            key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())),
                   repr(sorted(options.__dict__.items())), target.arch)
            if key in self.compiled:
                continue
            self.compiled.add(key)
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            assert kernel.asm["cubin"], (fn.__name__, target)

    def install(self):
        compiler = self

        def autotuned_run(self, *args, grid=None, warmup=False, **kwargs):
            for config in self.configs if compiler.every_config else self.configs[:1]:
                compiler.compile_launch(self.fn, args, {**kwargs, **config.all_kwargs()})

        def jit_run(self, *args, grid=None, warmup=False, **kwargs):
            compiler.compile_launch(self, args, kwargs)

        Autotuner.run, JITFunction.run = autotuned_run, jit_run


def sampling(backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        latent = torch.zeros(40, dtype=dtype)
        seed = torch.tensor(1)
        backend.reparameterize_forward(latent, latent, seed, 3)
        backend.reparameterize_backward(torch.zeros(120, dtype=dtype), latent, seed, 3, True, True)


# (data dtype, latent dtype, log-scale layout, prior, free bits, likelihood)
LOSSES = [
    (torch.float32, torch.float32, "SBD", "datapoint", 0.5, "gaussian"),
    (torch.bfloat16, torch.float32, "11D", "shared", 0.0, "gaussian"),
    (torch.float16, torch.float16, "S11", None, 0.5, "gaussian"),
    (torch.float64, torch.float64, "1B1", "shared", 0.5, "gaussian"),
    (torch.bfloat16, torch.bfloat16, None, None, 0.0, "bernoulli"),
    (torch.float32, torch.bfloat16, "1BD", "shared", 0.3, "laplace"),
    (torch.float64, torch.float64, None, "datapoint", 0.0, "laplace"),
    (torch.float32, torch.float32, None, "shared", 0.5, "continuous_bernoulli"),
    (torch.bfloat16, torch.float32, None, None, 0.0, "continuous_bernoulli"),
    (torch.float64, torch.float64, None, None, 0.0, "continuous_bernoulli"),
]


def losses(backend, compiler, every_config):
    from op_args import elbo_args
    for index, (data, latents, layout, prior, free_bits, likelihood) in enumerate(LOSSES):
        compiler.every_config = every_config and index == 0
        args = elbo_args(batch=6, features=300, latent=5, samples=2, dtype=data,
                         latent_dtype=latents, log_scale=layout, prior=prior,
                         free_bits=free_bits, likelihood=likelihood, grad_scale=True,
                         reduction="none", device=torch.device("cpu"))
        backend.elbo(*args.backend_args())
        if every_config:
            return  # the autotuner run covers the first loss only
    compiler.every_config = False


# (data dtype, latent dtype, log-scale layout, prior, likelihood, samples, DReG); 64 samples of
# 3 features make the tiles 64 × 16 instead of 1 × 512.
BOUNDS = [
    (torch.float32, torch.float32, "SBD", "datapoint", "gaussian", 2, False),
    (torch.bfloat16, torch.float32, "11D", "shared", "laplace", 2, True),
    (torch.float16, torch.float16, "S11", None, "gaussian", 64, False),
    (torch.float64, torch.float64, "1B1", "shared", "gaussian", 2, False),
    (torch.float32, torch.bfloat16, None, "datapoint", "continuous_bernoulli", 64, True),
    (torch.float64, torch.float32, None, None, "bernoulli", 2, False),
]


def bounds(backend):
    """The importance-weighted bound: the loss's tensors, z and a log-weight offset (values do
    not matter to a compile)."""
    from op_args import elbo_args
    for data, latents, layout, prior, likelihood, samples, dreg in BOUNDS:
        features = 3 if samples > 2 else 300
        args = elbo_args(batch=6, features=features, latent=5, samples=samples, dtype=data,
                         latent_dtype=latents, log_scale=layout, prior=prior,
                         likelihood=likelihood, grad_scale=True, reduction="none",
                         device=torch.device("cpu"))
        x, x_hat, theta, mu, logvar, prior_mu, prior_logvar = args.inputs.values()
        z = mu.expand(samples, *mu.shape).contiguous()
        offset = torch.zeros(samples, 6, dtype=args.grad_scale.dtype)
        inputs = (x, x_hat, theta, z, mu, logvar, prior_mu, prior_logvar, offset)
        backend.iwae(*inputs, args.grad_scale, int(args.likelihood), args.x_log_scale_const,
                     int(args.reduction), dreg, [t is not None for t in inputs])


def scaling(backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grads = [torch.zeros(2, 6, 300, dtype=dtype), torch.zeros(1, 6, 5, dtype=dtype)]
        backend.scale_(grads, torch.ones(6, dtype=acc))
        backend.scale_([g.view(-1) for g in grads], torch.tensor(2.0, dtype=acc))


def mixtures(backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        z, mu = torch.zeros(2, 6, 5, dtype=dtype), torch.zeros(6, 5, dtype=dtype)
        means, logits = torch.zeros(20, 5, dtype=dtype), torch.zeros(20, dtype=dtype)
        backend.mixture_log_ratio(z, mu, mu, means, means, logits)
        rows = torch.zeros(2, 6, dtype=acc)
        backend.mixture_log_ratio_backward(rows, z, mu, mu, means, means, logits, rows, [True] * 6)


# (logits dtype, classes last, K, target dtype, grad_scale, needs_grad) of the categorical op
CATEGORICAL = [
    (torch.float32, True, 256, torch.uint8, False, True),
    (torch.float32, False, 256, torch.uint8, True, True),
    (torch.bfloat16, True, 5000, torch.int64, False, True),
    (torch.float16, False, 3, torch.int64, False, True),
    (torch.float64, False, 17, torch.int64, True, True),
    (torch.float32, True, 2, torch.int64, False, False),
]


def categorical(backend):
    for dtype, classes_last, classes, target_dtype, grad_scale, needs in CATEGORICAL:
        shape = (2, 6, 300, classes) if classes_last else (2, 6, classes, 300)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        backend.categorical(torch.zeros(shape, dtype=dtype),
                            torch.zeros(6, 300, dtype=target_dtype),
                            torch.ones(6, dtype=acc) if grad_scale else None, classes_last, 0,
                            [needs])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-config", action="store_true")
    options = parser.parse_args()
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the Triton interpreter"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # op_args, cases
    compiler = Compiler()
    compiler.install()
    from fastvae.backends import triton as backend
    if not options.every_config:
        sampling(backend)
        scaling(backend)
        bounds(backend)
        mixtures(backend)
        categorical(backend)
    losses(backend, compiler, options.every_config)
    print(len(compiler.compiled), "kernel variants compiled for sm_80 and sm_90")


if __name__ == "__main__":
    main()
