"""fastvae inside other people's training code (issue #6): torch.compile, autocast,
DistributedDataParallel, host reads and CUDA graphs, determinism. Every test runs on each
backend under test (the shared ``backend`` fixture); the CUDA cases skip without a GPU.

Inductor compiles are slow on small machines: only ``test_compiled_training_step_matches_eager``
uses inductor, once per backend."""
import copy
import socket
import time

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

import ddp_worker
import fastvae
from fastvae import _backends, _ops

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, FEATURES, LATENT, SAMPLES = 4, 6, 3, 2


def runs_on(backend, device_type):
    return device_type in _backends.module(backend).DEVICE_TYPES


def needs_cuda_backend(backend):
    if not runs_on(backend, "cuda"):
        pytest.skip(f"backend {backend!r} has no CUDA kernels in this build")


# ----------------------------------------------------------------------------------------------
# a small VAE whose training step uses every public function
# ----------------------------------------------------------------------------------------------
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
        kl = fastvae.gaussian_kl(mu, logvar, self.prior_mu, self.prior_logvar)
        nll_event = fastvae.gaussian_nll(x, x_hat, self.event_logvar, reduction="mean")
        nll_scalar = fastvae.gaussian_nll(x, x_hat[1], self.scalar_logvar)
        nll_sigma = fastvae.gaussian_nll(x, x_hat, sigma=self.log_sigma.exp(), reduction="sum")
        nll_bernoulli = fastvae.bernoulli_nll(x_binary, x_hat[0], reduction="sum")
        module = self.criterion(x, x_hat, mu, logvar)
        weights = torch.linspace(0.5, 1.5, x.shape[0])
        total = (terms.loss + 0.1 * one_sample + 0.1 * (weights * bernoulli).sum() + kl.mean()
                 + nll_event + 0.1 * (weights * nll_scalar).sum() + 0.01 * nll_sigma
                 + 0.1 * nll_bernoulli + 0.01 * module)
        return total, terms.nll, terms.kl


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, FEATURES, generator=g), torch.rand(BATCH, FEATURES, generator=g).round()


def train(model, step_fn, x, x_binary, betas):
    """SGD steps with the noise seeded per step; the outputs and gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for i, beta in enumerate(betas):
        torch.manual_seed(100 + i)  # the seed reparameterize draws
        optimizer.zero_grad(set_to_none=True)
        outputs = step_fn(x, x_binary, beta)
        outputs[0].backward()
        history.append(([o.detach() for o in outputs],
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history


# ----------------------------------------------------------------------------------------------
# 1. torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, compiler):
    """fullgraph=True over a step using every public function; same values and gradients as
    eager for three SGD steps; a new tensor beta each step compiles nothing new."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = EveryFunctionVAE()
    compiled_model = copy.deepcopy(eager_model)
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x, x_binary = batch()
    betas = [torch.tensor(b) for b in (0.5, 0.8, 1.0)]

    want = train(eager_model, eager_model, x, x_binary, betas)
    got = train(compiled_model, compiled, x, x_binary, betas)
    tolerance = {} if compiler == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    for step, ((outputs, grads), (want_outputs, want_grads)) in enumerate(zip(got, want)):
        for name, a, b in zip(("loss", "nll", "kl"), outputs, want_outputs):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"step {step} {name}: {m}")
        assert grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], **tolerance,
                                       msg=lambda m: f"step {step} grad {name}: {m}")
    assert counter.frame_count == 1, "changing a tensor beta must not recompile"


def test_switching_backend_recompiles(backend, monkeypatch):
    """The backend is resolved at trace time (a constant in the graph) and the selection is
    guarded, so compiled code never keeps running a backend that is no longer selected."""
    others = [name for name in fastvae.available_backends() if name != backend and runs_on(name, "cpu")]
    if not others:
        pytest.skip("needs a second CPU backend")
    other = others[0]
    module = _backends.module(other)
    calls, original = [], module.elbo
    monkeypatch.setattr(module, "elbo", lambda *a: calls.append(1) or original(*a))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, mu = torch.randn(3, 4), torch.randn(3, 2)
    fn = torch.compile(lambda x, mu: fastvae.elbo_loss(x, x * 0.5, mu, mu), backend=counter,
                       fullgraph=True)
    want = fn(x, mu)
    assert not calls
    with fastvae.use_backend(other):
        got = fn(x, mu)
    assert calls and counter.frame_count == 2
    torch.testing.assert_close(got, want)


def test_first_compiled_call_in_a_fresh_process_compiles_once(backend, monkeypatch):
    """A user who never calls set_backend: FASTVAE_BACKEND (or 'auto') picks the backend."""
    monkeypatch.setattr(_backends, "_selected", backend)  # `import fastvae` with FASTVAE_BACKEND set
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, mu = torch.randn(3, 4), torch.randn(3, 2)
    fn = torch.compile(lambda x, mu, beta: fastvae.elbo_loss(x, x * 0.5, mu, mu, beta=beta),
                       backend=counter, fullgraph=True)
    for beta in (0.5, 0.7, 0.9):
        fn(x, mu, torch.tensor(beta))
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------
# torch.library.opcheck for the ops and arguments tests/test_edge_cases.py does not cover
# ----------------------------------------------------------------------------------------------
def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_()


def _elbo_args(backend, dtype=torch.float32, x_logvar=(1, 1, 1), prior=None, bernoulli=False,
               reduction="mean", needs_x=True, hat_dtype=None, beta_grad=False, free_bits=0.0):
    """Arguments of fastvae::elbo for B=5, S=2, D=6, d=3; ``x_logvar`` a shape or None."""
    b, s, d_x, d = 5, 2, 6, 3
    x = torch.rand(b, d_x, dtype=torch.float64).to(dtype) if bernoulli else _leaf(b, d_x, dtype=dtype)
    x.requires_grad_(needs_x)
    lv = None if x_logvar is None else _leaf(*x_logvar, dtype=dtype)
    priors = (None, None) if prior is None else (_leaf(prior, d, dtype=dtype), _leaf(prior, d, dtype=dtype))
    beta = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        requires_grad=beta_grad)
    rows = lambda shape: reduction != "none" or shape[-2] == b  # noqa: E731 (per-datapoint rows)
    needs = [needs_x and rows(x.shape), True, lv is not None and rows(lv.shape), True, True,
             prior is not None and rows(priors[0].shape), prior is not None and rows(priors[1].shape)]
    grad_scale = torch.rand(b, dtype=beta.dtype) if reduction == "none" else None
    return (x, _leaf(s, b, d_x, dtype=hat_dtype or dtype), lv, 0.0 if lv is not None else -0.4,
            _leaf(b, d, dtype=dtype), _leaf(b, d, dtype=dtype), *priors, beta, free_bits, bernoulli,
            reduction, grad_scale, needs, backend)


OPCHECK_ELBO = {
    "bernoulli_shared_prior_sum_beta_grad": dict(x_logvar=None, bernoulli=True, prior=1,
                                                 reduction="sum", beta_grad=True),
    "datapoint_prior_sigma_const_free_bits": dict(x_logvar=None, prior=5, free_bits=0.2),
    "logvar_datapoint_bf16_decoder": dict(x_logvar=(1, 5, 6), hat_dtype=torch.bfloat16, needs_x=False),
    "logvar_full_none_grad_scale": dict(x_logvar=(2, 5, 6), reduction="none", prior=5),
    "float64_logvar_scalar_prior": dict(dtype=torch.float64, prior=1, reduction="sum"),
}


@pytest.mark.parametrize("name", OPCHECK_ELBO)
def test_opcheck_elbo_options(backend, name):
    torch.library.opcheck(_ops.elbo, _elbo_args(backend, **OPCHECK_ELBO[name]))


def test_opcheck_reparameterize_dtypes(backend):
    for dtype in (torch.float64, torch.bfloat16):
        mu, logvar = _leaf(10, dtype=dtype), _leaf(10, dtype=dtype)
        torch.library.opcheck(_ops.reparameterize, (mu, logvar, torch.tensor(7), 1, backend))
    torch.library.opcheck(_ops.reparameterize_backward,
                          (torch.randn(30, dtype=torch.float64), torch.randn(10, dtype=torch.float64),
                           torch.tensor(7), 3, backend, True, True))
    torch.library.opcheck(_ops.reparameterize_backward,
                          (torch.randn(30), torch.randn(10), torch.tensor(7), 3, backend, False, True))


def test_opcheck_native_ops(backend):
    """The native extension's own ops (fastvae_native::*, fake impls in fastvae/_native.py)."""
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    native = torch.ops.fastvae_native
    plain = lambda args: tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    for options in ({}, {"dtype": torch.float64, "x_logvar": (2, 5, 6), "prior": 5, "reduction": "none"},
                    {"x_logvar": None, "bernoulli": True, "prior": 1, "reduction": "sum", "needs_x": False}):
        torch.library.opcheck(native.elbo.default, plain(_elbo_args(backend, **options)[:-1]))
    torch.library.opcheck(native.reparameterize.default, (torch.randn(10), torch.randn(10), torch.tensor(7), 3))
    torch.library.opcheck(native.reparameterize_backward.default,
                          (torch.randn(30), torch.randn(10), torch.tensor(7), 3, False, True))


def test_opcheck_float64_data_without_grad(backend):
    """The usual case: the data x does not require grad (float64 inputs)."""
    torch.library.opcheck(_ops.elbo, _elbo_args(backend, dtype=torch.float64, needs_x=False))


def test_opcheck_float64_sampling_backward_without_mu(backend):
    torch.library.opcheck(_ops.reparameterize_backward,
                          (torch.randn(30, dtype=torch.float64), torch.randn(10, dtype=torch.float64),
                           torch.tensor(7), 3, backend, False, True))


# ----------------------------------------------------------------------------------------------
# 2. autocast
# ----------------------------------------------------------------------------------------------
def autocast_step(device, dtype, autocast):
    """One step of a Linear VAE with a per-element decoder log-variance spanning −10…+10.
    Returns the loss, parameter gradients, and the dtypes of activations and their gradients."""
    torch.manual_seed(0)
    features, latent, rows = 10, 3, 8
    encoder = nn.Linear(features, 2 * latent).to(device)
    decoder = nn.Linear(latent, 2 * features).to(device)
    x = torch.randn(rows, features, device=device)
    offset = torch.linspace(-10.0, 10.0, features, device=device)
    seen = {}

    def watch(name, t):
        t.register_hook(lambda g: seen.__setitem__(name, (t.dtype, g.dtype, bool(g.isfinite().all()))))
        return t

    with torch.autocast(device, dtype=dtype, enabled=autocast):
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(watch("mu", mu), watch("logvar", logvar), SAMPLES, seed=11)
        x_hat, x_logvar = decoder(watch("z", z)).chunk(2, dim=-1)
        x_logvar = x_logvar + offset.to(x_logvar.dtype)
        loss = fastvae.elbo_loss(x, watch("x_hat", x_hat), mu, logvar,
                                 x_logvar=watch("x_logvar", x_logvar), free_bits=0.05)
    loss.backward()
    params = list(encoder.named_parameters(prefix="encoder")) + list(decoder.named_parameters(prefix="decoder"))
    return loss.detach(), {n: p.grad for n, p in params}, seen


def check_autocast(device, dtype):
    loss, grads, seen = autocast_step(device, dtype, autocast=True)
    want_loss, want_grads, _ = autocast_step(device, dtype, autocast=False)
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert set(seen) == {"mu", "logvar", "z", "x_hat", "x_logvar"}
    for name, (input_dtype, grad_dtype, finite) in seen.items():
        assert input_dtype == dtype and grad_dtype == dtype, (name, input_dtype, grad_dtype)
        assert finite, f"non-finite gradient for {name}"
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.isfinite().all(), name
        error = (grad - want_grads[name]).norm() / want_grads[name].norm()
        assert error < 0.1, f"{name}: relative error {error:.3g} against float32"


def test_autocast_bfloat16_cpu(backend):
    check_autocast("cpu", torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda(backend, dtype):
    needs_cuda_backend(backend)
    check_autocast("cuda", dtype)


# ----------------------------------------------------------------------------------------------
# 3. DistributedDataParallel (gloo, two CPU processes)
# ----------------------------------------------------------------------------------------------
DDP_TIMEOUT_S = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_one_process(backend, tmp_path):
    """'mean': DDP's averaged gradients equal one process on the whole batch. 'sum': they equal
    the whole-batch gradients divided by the world size (multiply the loss by it). Free bits:
    each rank decides active dims on its own shard, so DDP equals the mean of per-shard runs,
    not the whole-batch run."""
    w = ddp_worker
    world = 2
    prefix = str(tmp_path / "grads")
    workers = torch.multiprocessing.start_processes(
        w.run, args=(world, _free_port(), prefix, backend), nprocs=world, join=False,
        start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker fails
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {DDP_TIMEOUT_S} s")
    ranks = [torch.load(f"{prefix}.rank{r}.pt") for r in range(world)]
    x, shift = w.data()
    seeds = [w.SEED + r for r in range(world)]

    def single(rows, seeds, reduction, free_bits):
        model = w.make_model()
        model(x[rows], shift[rows], seeds, reduction, free_bits).backward()
        return w.gradients(model)

    whole = slice(None)
    close = dict(rtol=1e-5, atol=1e-6)
    for scenario in w.SCENARIOS:
        for name in ranks[0][scenario]:  # the all-reduce leaves every rank with the same grads
            torch.testing.assert_close(ranks[1][scenario][name], ranks[0][scenario][name], **close)
    ddp = {scenario: ranks[0][scenario] for scenario in w.SCENARIOS}

    want = single(whole, seeds, "mean", 0.0)
    for name in want:
        torch.testing.assert_close(ddp[("mean", 0.0)][name], want[name], **close)

    want = single(whole, seeds, "sum", 0.0)
    for name in want:
        torch.testing.assert_close(world * ddp[("sum", 0.0)][name], want[name], **close)

    # free bits: latent dim 0 is active on rank 0's shard and on the whole batch, not on rank 1's
    model = w.make_model()
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        kl = fastvae.gaussian_kl((mu + shift).unsqueeze(-1), logvar.unsqueeze(-1))  # [B, d]
    halves = [kl[w.shard(r, world)].mean(0) for r in range(world)]
    assert halves[0][0] >= w.FREE_BITS > halves[1][0] and kl.mean(0)[0] >= w.FREE_BITS
    scenario = ("mean", w.FREE_BITS)
    per_shard = [single(w.shard(r, world), [seeds[r]], *scenario) for r in range(world)]
    whole_batch = single(whole, seeds, *scenario)
    for name in whole_batch:
        torch.testing.assert_close(ddp[scenario][name], sum(g[name] for g in per_shard) / world, **close)
    encoder_grad = ddp[scenario]["encoder.weight"]
    assert not torch.allclose(encoder_grad, whole_batch["encoder.weight"], **close), \
        "free bits on local shards should differ from free bits on the whole batch here"


# ----------------------------------------------------------------------------------------------
# 4. host reads, device syncs, CUDA graphs
# ----------------------------------------------------------------------------------------------
HOST_READS = ("aten._local_scalar_dense.default", "aten.item.default")
HOST_TO_DEVICE = "aten.lift_fresh.default"  # torch.tensor(host value, device=...)


class OpRecorder(TorchDispatchMode):
    """Records every op dispatched while active, and descends into fastvae's own ops so that the
    ops their kernels dispatch are recorded too (at depth 1 and more)."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, depth, args, kwargs)
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((str(func), self.depth, args, kwargs))
        if func.namespace.startswith("fastvae"):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, device.type.upper()))
            self.depth += 1
            try:
                with self:
                    return func.redispatch(keys, *args, **kwargs)
            finally:
                self.depth -= 1
        return func(*args, **kwargs)

    def names(self, depth=None):
        return [name for name, d, _, _ in self.calls if depth is None or d == depth]

    def host_reads(self, depth=None):
        return [(name, d, args) for name, d, args, _ in self.calls
                if name in HOST_READS and (depth is None or d == depth)]


def latent_step_inputs(device="cpu"):
    g = torch.Generator().manual_seed(5)
    leaf = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()  # noqa: E731
    return (torch.randn(BATCH, FEATURES, generator=g).to(device), leaf(SAMPLES, BATCH, FEATURES),
            leaf(BATCH, FEATURES), leaf(BATCH, LATENT), leaf(BATCH, LATENT), leaf(LATENT), leaf(LATENT))


def sample_and_loss(x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar, beta, reduction="mean"):
    z = fastvae.reparameterize(mu, logvar, SAMPLES)
    return fastvae.elbo_loss(x, x_hat + z.mean(-1, keepdim=True), mu, logvar, x_logvar=x_logvar,
                             beta=beta, free_bits=0.1, prior_mu=prior_mu, prior_logvar=prior_logvar,
                             reduction=reduction)


def test_forward_reads_nothing_on_the_host(backend):
    """The seed is a tensor drawn on the inputs' device (torch.randint) and no value is read
    back in forward. Inside the kernels: a backend whose code also runs on CUDA reads nothing;
    a CPU-only kernel may read a CPU scalar (e.g. beta), which is no device sync."""
    inputs, beta = latent_step_inputs(), torch.tensor(0.7)
    with OpRecorder() as record:
        sample_and_loss(*inputs, beta=beta)
    randint = [(args, kwargs) for name, depth, args, kwargs in record.calls
               if depth == 0 and name.startswith("aten.randint")]
    assert len(randint) == 1 and randint[0][1]["device"] == torch.device("cpu")
    assert "fastvae.reparameterize.default" in record.names(0)
    assert "fastvae.elbo.default" in record.names(0)
    assert record.host_reads(depth=0) == []
    assert HOST_TO_DEVICE not in record.names(0)
    kernel_reads = record.host_reads()
    if runs_on(backend, "cuda"):
        assert kernel_reads == []
    for name, _, args in kernel_reads:
        assert args[0].device.type == "cpu" and args[0].numel() == 1, (name, args[0].shape)


def test_api_copies_no_host_value_to_the_device(backend):
    """``torch.tensor(value, device=d)`` (aten.lift_fresh) is a blocking host-to-device copy
    when d is a CUDA device: a sync, and an error under CUDA-graph capture. Neither the API
    with Python-number arguments (float beta, sigma, int seed) nor the loss kernels make one."""
    x, x_hat, _, mu, logvar, _, _ = latent_step_inputs()
    with OpRecorder() as record:
        fastvae.elbo_loss(x, x_hat, mu, logvar)
        fastvae.elbo_loss(x, x_hat, mu, logvar, sigma=0.5, beta=0.3)
        fastvae.gaussian_kl(mu, logvar)
        fastvae.gaussian_nll(x, x_hat)
        fastvae.bernoulli_nll(x.sigmoid(), x_hat)
    assert HOST_TO_DEVICE not in record.names()
    with OpRecorder() as record:
        fastvae.reparameterize(mu, logvar, seed=3)
    assert HOST_TO_DEVICE not in record.names(0)


def test_backward_reads_only_the_cpu_upstream_gradient(backend):
    """Eager CPU backward reads the 0-dim upstream gradient (to skip a pass over the gradients
    when it is exactly 1, see ``_scale`` in _ops.py): a read of a CPU scalar, not a device sync.
    It is skipped for non-CPU gradients (tested on CUDA) and while tracing (next test). With
    reduction='none' the upstream gradient is a vector and nothing is read."""
    inputs = latent_step_inputs()
    leaves = inputs[1:]
    torch.manual_seed(8)
    loss = sample_and_loss(*inputs, beta=torch.tensor(0.7))
    upstream = torch.tensor(2.0)
    with OpRecorder() as record:
        grads = torch.autograd.grad(loss, leaves, upstream)
    reads = record.host_reads()
    assert reads, "expected the documented read of the CPU upstream gradient"
    for name, depth, args in reads:
        assert depth == 0 and args[0].dim() == 0 and args[0].item() == 2.0, (name, args[0])
    torch.manual_seed(8)
    want = torch.autograd.grad(sample_and_loss(*inputs, beta=torch.tensor(0.7)), leaves)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, 2.0 * expected)

    loss = sample_and_loss(*inputs, beta=torch.tensor(0.7), reduction="none")
    with OpRecorder() as record:
        torch.autograd.grad(loss, leaves, torch.linspace(0.5, 1.0, BATCH))
    assert record.host_reads(depth=0) == []
    if runs_on(backend, "cuda"):
        assert record.host_reads() == []


def graph_recorder(graphs):
    """An aot_eager-like torch.compile backend that keeps the forward and backward FX graphs."""
    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def test_compiled_forward_and_backward_read_nothing(backend):
    """Under torch.compile(fullgraph=True) neither graph contains a host read
    (aten._local_scalar_dense): the upstream-gradient shortcut is skipped while tracing."""
    torch._dynamo.reset()
    graphs = []
    inputs = latent_step_inputs()
    fn = torch.compile(sample_and_loss, backend=graph_recorder(graphs), fullgraph=True)
    loss = fn(*inputs, beta=torch.tensor(0.7))
    loss.backward()
    kinds = [kind for kind, _ in graphs]
    assert kinds == ["forward", "backward"], kinds
    targets = {kind: [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
               for kind, gm in graphs}
    assert "fastvae.elbo.default" in targets["forward"]
    assert "fastvae.reparameterize.default" in targets["forward"]
    assert "fastvae.reparameterize_backward.default" in targets["backward"]
    for kind, names in targets.items():
        assert not [n for n in names if n in HOST_READS], (kind, names)


@cuda_only
def test_cuda_forward_and_backward_do_not_sync(backend):
    needs_cuda_backend(backend)
    inputs = latent_step_inputs("cuda")
    beta = torch.tensor(0.7, device="cuda")
    sample_and_loss(*inputs, beta=beta).backward()  # warm-up: lazy initialisation may sync
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with OpRecorder() as record:
            loss = sample_and_loss(*inputs, beta=beta)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert record.host_reads() == []


@cuda_only
def test_cuda_default_arguments_do_not_sync(backend):
    needs_cuda_backend(backend)
    x, x_hat, _, mu, logvar, _, _ = latent_step_inputs("cuda")
    fastvae.elbo_loss(x, x_hat, mu, logvar).backward()  # warm-up
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastvae.elbo_loss(x, x_hat, mu, logvar, sigma=0.5).backward()
        fastvae.gaussian_kl(mu, logvar).sum().backward()
        fastvae.reparameterize(mu, logvar, seed=3).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@cuda_only
def test_cuda_graph_replays_with_fresh_noise(backend):
    """A captured training step (sampling, loss, backward) replays with fresh noise: the
    captured torch.randint advances the default CUDA generator's Philox offset on every replay,
    and each replay matches the eager step from the same generator state. A seed tensor that is
    refilled before each replay gives a chosen stream instead."""
    needs_cuda_backend(backend)
    torch.manual_seed(0)
    encoder = nn.Linear(FEATURES, 2 * LATENT).cuda()
    decoder = nn.Linear(LATENT, 2 * FEATURES).cuda()
    params = list(encoder.parameters()) + list(decoder.parameters())
    x = torch.randn(BATCH, FEATURES, device="cuda")
    beta = torch.tensor(0.5, device="cuda")
    seed = torch.tensor(0, device="cuda")

    def step(fixed_seed):
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(mu, logvar, SAMPLES, seed=seed if fixed_seed else None)
        x_hat, x_logvar = decoder(z).chunk(2, dim=-1)
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, beta=beta,
                                 free_bits=0.01)
        loss.backward()
        return loss, z

    def capture(fixed_seed):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for p in params:
                    p.grad = None
                step(fixed_seed)
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step(fixed_seed)
        return graph, outputs

    graph, (loss, z) = capture(fixed_seed=False)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append((loss.clone(), z.clone(), encoder.weight.grad.clone()))
    assert not torch.equal(replays[0][1], replays[1][1]), "replays must draw fresh noise"
    assert all(t.isfinite().all() for replay in replays for t in replay)
    torch.cuda.manual_seed(5)
    graph.replay()
    replayed_z = z.clone()
    torch.cuda.manual_seed(5)
    with torch.no_grad():
        mu, logvar = encoder(x).chunk(2, dim=-1)
        torch.testing.assert_close(replayed_z, fastvae.reparameterize(mu, logvar, SAMPLES))

    graph, (loss, z) = capture(fixed_seed=True)
    seed.fill_(1234)
    graph.replay()
    with torch.no_grad():
        mu, logvar = encoder(x).chunk(2, dim=-1)
        torch.testing.assert_close(z, fastvae.reparameterize(mu, logvar, SAMPLES, seed=1234))


# ----------------------------------------------------------------------------------------------
# 5. determinism
# ----------------------------------------------------------------------------------------------
def test_training_step_is_bitwise_repeatable(backend):
    """Same seed → bitwise the same loss and gradients (multi-sample, free bits, priors, every
    function), and a different seed gives different noise."""
    x, x_binary = batch()
    runs = []
    for seed in (9, 9, 10):
        torch.manual_seed(0)
        model = EveryFunctionVAE()
        torch.manual_seed(seed)
        outputs = model(x, x_binary, torch.tensor(0.6))
        outputs[0].backward()
        runs.append([o.detach() for o in outputs] + [p.grad for p in model.parameters()])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


def test_bitwise_across_thread_counts(backend):
    """fastvae alone (no Linear layers, whose BLAS need not be thread-invariant): the same
    loss and gradients with 1 and 2 intra-op threads, on inputs big enough to be split."""
    rows, features, latent = (8, 64, 8) if backend == "triton" else (256, 512, 160)
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(SAMPLES, rows, features, generator=g), torch.randn(rows, features, generator=g),
            torch.randn(rows, latent, generator=g), 0.5 * torch.randn(rows, latent, generator=g)]
    x = torch.randn(rows, features, generator=g)
    results, threads_before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in base]
            x_hat, x_logvar, mu, logvar = leaves
            z = fastvae.reparameterize(mu, logvar, SAMPLES, seed=77)
            loss = fastvae.elbo_loss(x, x_hat + z.mean(-1, keepdim=True), mu, logvar,
                                     x_logvar=x_logvar, free_bits=0.4, beta=torch.tensor(0.8))
            loss.backward()
            results.append([loss.detach(), z.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads_before)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"
