"""Host reads, device synchronisation and CUDA graphs.

On every device: the API reads no value back to the host in forward or backward (a kernel of a
CPU backend may read a CPU scalar, which is no device sync), copies no host value to the
device, and neither graph of a compiled step contains a host read. On CUDA
(``FASTVAE_TEST_DEVICE=cuda``): forward and backward run under
``torch.cuda.set_sync_debug_mode("error")``, and a captured forward+backward replays equal to
eager, also when the upstream gradient changes between replays."""
import os
import traceback

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from cases import TEST_DEVICE, generator
from conftest import cuda_only

BATCH, FEATURES, LATENT, SAMPLES = 4, 6, 3, 2
HOST_READS = ("aten._local_scalar_dense.default", "aten.item.default")
HOST_TO_DEVICE = "aten.lift_fresh.default"  # torch.tensor(host value, device=...)


# Where a host value may be lifted into a tensor: the kernels of a backend may make CPU scalar
# constants (an operand of a device op, no copy); the API layer may not lift anything.
API_FILES = ("functional.py", "_ops.py", "_validation.py", "modules.py",
             os.path.join("backends", "__init__.py"))


def _api_frame():
    """Whether the innermost fastvae frame of the current Python stack is in the API layer."""
    for frame in reversed(traceback.extract_stack()):
        if f"{os.sep}fastvae{os.sep}" in frame.filename:
            return frame.filename.endswith(API_FILES)
    return False


class OpRecorder(TorchDispatchMode):
    """Records every op dispatched while active, and descends into fastvae's own ops so that the
    ops their kernels dispatch are recorded too (at depth 1 and more)."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, depth, args, kwargs)
        self.lifts = []  # (device of the lifted tensor, made by the API layer)
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((str(func), self.depth, args, kwargs))
        if str(func) == HOST_TO_DEVICE:
            self.lifts.append((args[0].device, _api_frame()))
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

    def host_to_device(self):
        """Lifts of host values that copy to a device, or that the API layer makes at all."""
        return [(device, api) for device, api in self.lifts if device.type != "cpu" or api]

    def host_reads(self):
        return [(name, d, args) for name, d, args, _ in self.calls if name in HOST_READS]


def latent_step_inputs():
    g = generator(5)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, device=TEST_DEVICE).requires_grad_()

    return (torch.randn(BATCH, FEATURES, generator=g, device=TEST_DEVICE),
            leaf(SAMPLES, BATCH, FEATURES), leaf(BATCH, FEATURES), leaf(BATCH, LATENT),
            leaf(BATCH, LATENT), leaf(LATENT), leaf(LATENT))


def sample_and_loss(x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar, beta,
                    reduction="mean", likelihood="gaussian"):
    z = fastvae.reparameterize(mu, logvar, SAMPLES)
    scale = {"x_logvar": x_logvar} if likelihood == "gaussian" else {"x_logscale": x_logvar}
    return fastvae.elbo_loss(x, x_hat + z.mean(-1, keepdim=True), mu, logvar, **scale,
                             likelihood=likelihood, beta=beta, free_bits=0.1, prior_mu=prior_mu,
                             prior_logvar=prior_logvar, reduction=reduction)


def assert_only_cpu_scalar_reads(record):
    """A read of a CPU scalar is no device sync; with inputs on CUDA nothing is read."""
    reads = record.host_reads()
    for name, _, args in reads:
        assert args[0].device.type == "cpu" and args[0].numel() == 1, (name, args[0].shape)
    if TEST_DEVICE.type != "cpu":
        assert reads == [], reads


def test_forward_reads_nothing_on_the_host(backend):
    """The seed is a tensor drawn on the inputs' device (torch.randint) and no value is read
    back in forward (eager calls reach the backend directly; under torch.compile the ops are
    the registered custom ops, see test_compiled_forward_and_backward_read_nothing)."""
    inputs, beta = latent_step_inputs(), torch.tensor(0.7)
    with OpRecorder() as record:
        sample_and_loss(*inputs, beta=beta)
        sample_and_loss(*inputs, beta=beta, likelihood="laplace")
    randint = [(args, kwargs) for name, depth, args, kwargs in record.calls
               if depth == 0 and name.startswith("aten.randint")]
    assert len(randint) == 2 and torch.device(randint[0][1]["device"]).type == TEST_DEVICE.type
    assert record.host_to_device() == []
    assert_only_cpu_scalar_reads(record)


def test_api_copies_no_host_value_to_the_device(backend):
    """``torch.tensor(value, device=d)`` (aten.lift_fresh) is a blocking host-to-device copy
    when d is a CUDA device: a sync, and an error under CUDA-graph capture. Neither the API
    with Python-number arguments (float beta, sigma, scale, int seed) nor the kernels make one."""
    x, x_hat, _, mu, logvar, _, _ = latent_step_inputs()
    with OpRecorder() as record:
        fastvae.elbo_loss(x, x_hat, mu, logvar)
        fastvae.elbo_loss(x, x_hat, mu, logvar, sigma=0.5, beta=0.3)
        fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="laplace", scale=0.5, beta=0.3)
        fastvae.gaussian_kl(mu, logvar)
        fastvae.gaussian_nll(x, x_hat)
        fastvae.laplace_nll(x, x_hat, scale=2.0)
        fastvae.bernoulli_nll(x.sigmoid(), x_hat)
        fastvae.reparameterize(mu, logvar, seed=3)
    assert record.host_to_device() == []


@pytest.mark.parametrize("reduction, upstream", [("mean", 2.0), ("mean", 1.0), ("none", None)])
def test_backward_reads_nothing_on_the_host(backend, reduction, upstream):
    """Backward scales the gradients formed in forward on the device (an early exit when the
    upstream gradient equals the previous one, decided by the kernel, not the host)."""
    inputs = latent_step_inputs()
    leaves = inputs[1:]
    upstream = (torch.linspace(0.5, 1.0, BATCH) if upstream is None else torch.tensor(upstream))
    torch.manual_seed(8)
    loss = sample_and_loss(*inputs, beta=torch.tensor(0.7), reduction=reduction)
    with OpRecorder() as record:
        grads = torch.autograd.grad(loss, leaves, upstream)
    assert_only_cpu_scalar_reads(record)
    torch.manual_seed(8)
    want = torch.autograd.grad(sample_and_loss(*inputs, beta=torch.tensor(0.7),
                                               reduction=reduction).mul(upstream).sum(), leaves)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected)


def graph_recorder(graphs):
    """An aot_eager-like torch.compile backend that keeps the forward and backward FX graphs."""
    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def test_compiled_forward_and_backward_read_nothing(backend):
    """Under torch.compile(fullgraph=True) neither graph contains a host read."""
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


# ----------------------------------------------------------------------------------------------
# CUDA only
# ----------------------------------------------------------------------------------------------
class no_sync:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any synchronising call raises."""

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)


@cuda_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_cuda_forward_and_backward_do_not_sync(backend, reduction, likelihood):
    inputs = latent_step_inputs()
    beta = torch.tensor(0.7)
    upstream = torch.rand(BATCH) if reduction == "none" else torch.tensor(3.0)
    sample_and_loss(*inputs, beta=beta, reduction=reduction,
                    likelihood=likelihood).backward(upstream)  # warm-up: lazy init may sync
    with no_sync(), OpRecorder() as record:
        loss = sample_and_loss(*inputs, beta=beta, reduction=reduction, likelihood=likelihood)
        loss.backward(upstream, retain_graph=True)
        loss.backward(upstream * 2)  # a second backward rescales on the device
    assert record.host_reads() == []


@cuda_only
def test_cuda_default_arguments_do_not_sync(backend):
    x, x_hat, _, mu, logvar, _, _ = latent_step_inputs()
    fastvae.elbo_loss(x, x_hat, mu, logvar).backward()  # warm-up
    fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="laplace", scale=0.5).backward()
    with no_sync():
        fastvae.elbo_loss(x, x_hat, mu, logvar, sigma=0.5).backward()
        fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="laplace", scale=0.5).backward()
        fastvae.gaussian_kl(mu, logvar).sum().backward()
        fastvae.reparameterize(mu, logvar, seed=3).sum().backward()


def _vae():
    torch.manual_seed(0)
    encoder = nn.Linear(FEATURES, 2 * LATENT)
    decoder = nn.Linear(LATENT, 2 * FEATURES)
    return encoder, decoder, list(encoder.parameters()) + list(decoder.parameters())


def _capture(step, params):
    """Warm up on a side stream (autotuning and lazy initialisation), then capture ``step``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@cuda_only
def test_cuda_graph_replay_equals_eager(backend):
    """A captured forward+backward (sampling with a seed tensor, the loss, backward with an
    upstream weight held in a tensor) replays equal to the eager step, also after the seed and
    the weight change between replays: the decision to skip the rescaling of the gradients is
    taken on the device at each replay, not at capture."""
    encoder, decoder, params = _vae()
    x = torch.randn(BATCH, FEATURES)
    beta, seed, weight = torch.tensor(0.5), torch.tensor(0), torch.tensor(1.0)

    def step():
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(mu, logvar, SAMPLES, seed=seed)
        x_hat, x_logvar = decoder(z).chunk(2, dim=-1)
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, beta=beta,
                                 free_bits=0.01)
        (loss * weight).backward()
        return loss

    graph, loss = _capture(step, params)
    static_grads = [p.grad for p in params]  # the replays write here, whatever p.grad is later
    for seed_value, weight_value in ((11, 1.0), (12, 3.0), (12, 1.0), (13, 0.5)):
        seed.fill_(seed_value)
        weight.fill_(weight_value)
        graph.replay()
        replayed = [loss.clone()] + [g.clone() for g in static_grads]
        for p in params:
            p.grad = None
        want = [step().detach()] + [p.grad for p in params]
        for got, expected in zip(replayed, want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@cuda_only
def test_cuda_graph_replays_with_fresh_noise(backend):
    """Without a seed, the captured torch.randint advances the default CUDA generator's Philox
    offset on every replay: each replay draws fresh noise, and matches the eager step from the
    same generator state."""
    encoder, decoder, params = _vae()
    x = torch.randn(BATCH, FEATURES)

    def step():
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(mu, logvar, SAMPLES)
        x_hat, x_logvar = decoder(z).chunk(2, dim=-1)
        fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar).backward()
        return z

    graph, z = _capture(step, params)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(z.clone())
    assert not torch.equal(replays[0], replays[1]), "replays must draw fresh noise"
    torch.cuda.manual_seed(5)
    graph.replay()
    replayed_z = z.clone()
    torch.cuda.manual_seed(5)
    with torch.no_grad():
        mu, logvar = encoder(x).chunk(2, dim=-1)
        torch.testing.assert_close(replayed_z, fastvae.reparameterize(mu, logvar, SAMPLES))

