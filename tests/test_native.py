"""What only the native backend needs checked: results independent of the thread count (to the
bit, and equal to the reference) with the kernels really running on the threads asked for, in
torch's own OpenMP runtime; the C++ noise stream against the Python one (also at Philox
counters past 2**32), and float64 gradcheck through the public API."""
import os
import subprocess
import sys

import pytest
import torch

import fastvae
from cases import TEST_DEVICE
from conftest import cpu_only, intra_op_threads
from fastvae import _philox
from noise import philox_normals
from op_args import elbo_args

native = pytest.importorskip("fastvae.backends.native", reason="fastvae._C not built")
from fastvae.backends import reference  # noqa: E402

ops = torch.ops.fastvae_native
pytestmark = pytest.mark.skipif(TEST_DEVICE.type not in native.DEVICE_TYPES,
                                reason=f"the native extension is not built for {TEST_DEVICE.type}")


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=TEST_DEVICE)


# B = 2048: 8 chunks of 256 rows, so partial sums over chunks (shared x_log_scale, shared prior,
# free-bits column means) are split between threads.
THREAD_CASES = {
    "per-feature log-scale, shared prior, free bits": dict(log_scale="11D", prior="shared",
                                                           free_bits=0.45),
    "per-sample log-scale, shared prior": dict(log_scale="S1D", prior="shared"),
    "scalar log-scale per sample": dict(log_scale="S11", free_bits=0.2),
    "bernoulli, weighted rows": dict(log_scale=None, prior="datapoint", free_bits=0.3,
                                     samples=1, likelihood="bernoulli", reduction="none",
                                     grad_scale=True),
    "laplace, shared log-scale, free bits": dict(likelihood="laplace", log_scale="111",
                                                 prior="shared", free_bits=0.45),
    "bfloat16 inputs": dict(log_scale="11D", prior="shared", free_bits=0.45, samples=1,
                            dtype=torch.bfloat16),
}


@cpu_only
@pytest.mark.parametrize("case", list(THREAD_CASES), ids=list(THREAD_CASES))
def test_elbo_bitwise_equal_across_thread_counts_and_close_to_reference(case):
    options = {"samples": 2, **THREAD_CASES[case]}
    args = elbo_args(batch=2048, latent=64, features=700, seed=7, **options).backend_args()
    with intra_op_threads(1):
        one = ops.elbo(*args)
    with intra_op_threads(2):
        two = ops.elbo(*args)
    want = reference.elbo(*args)
    tolerance = 2e-2 if options.get("dtype") == torch.bfloat16 else 2e-5
    for index, (a, b, w) in enumerate(zip(one, two, want)):
        assert torch.equal(a, b), f"output {index} differs between 1 and 2 threads"
        torch.testing.assert_close(a, w, rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f"output {index} against the reference: {m}")


# In a fresh process: the OpenMP runtimes mapped after `import torch`, then after loading _C.
_RUNTIMES_SCRIPT = """
import os, torch
def runtimes():
    paths = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
    prefixes = ("libgomp", "libiomp", "libomp")
    return sorted(p for p in paths if os.path.basename(p).startswith(prefixes))
before = runtimes()
import fastvae.backends.native
torch.ops.fastvae_native._parallel_threads()
print(before == runtimes(), before, runtimes())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_kernels_load_no_openmp_runtime_beside_torchs():
    """The kernels' parallel loops must run in the OpenMP runtime that torch.set_num_threads
    governs (CMakeLists.txt): a second one would keep its own thread count and threads."""
    result = subprocess.run([sys.executable, "-c", _RUNTIMES_SCRIPT], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("True"), result.stdout


@cpu_only
def test_reparameterize_bitwise_equal_across_thread_counts_and_close_to_reference():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2048 * 64, generator=g), torch.randn(2048 * 64, generator=g)
    seed = _seed(987654321987)
    grad_z = torch.randn(3 * mu.numel(), generator=g)
    for name in ("reparameterize_forward", "reparameterize_backward"):
        args = (mu, logvar, seed, 3) if name == "reparameterize_forward" else \
            (grad_z, logvar, seed, 3, True, True)
        with intra_op_threads(1):
            one = getattr(native, name)(*args)
        with intra_op_threads(2):
            two = getattr(native, name)(*args)
        want = getattr(reference, name)(*args)
        if name == "reparameterize_forward":
            one, two, want = (one,), (two,), (want,)
        for a, b, w in zip(one, two, want):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 4097, 100_003])
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 - 1])
def test_noise_stream_matches_python(numel, seed):
    seed = _seed(seed)
    expected = _philox.normal_stream(seed, numel)
    # with mu = 0 and logvar = 0, z is the noise itself
    zeros = torch.zeros(numel, device=TEST_DEVICE)
    eps = ops.reparameterize(zeros, zeros, seed, 1)
    torch.testing.assert_close(eps, expected, atol=1e-6, rtol=1e-6)


def test_noise_stream_over_samples_matches_python():
    seed = _seed(2**40 + 17)
    latent, samples = 37, 5  # 185 normals: the quarters cross sample boundaries
    expected = _philox.normal_stream(seed, latent * samples)
    zeros = torch.zeros(latent, device=TEST_DEVICE)
    eps = ops.reparameterize(zeros, zeros, seed, samples)
    torch.testing.assert_close(eps, expected, atol=1e-6, rtol=1e-6)


@cpu_only
@pytest.mark.skipif(not hasattr(ops, "_philox_normals"),
                    reason="needs the native test hook fastvae_native::_philox_normals(Tensor "
                           "seed, int first_call, int count) -> Tensor (a [4, count] float32 "
                           "block from the CPU noise code); a z with Philox counters past 2**32 "
                           "has more than 2**34 elements (64 GiB)")
@pytest.mark.parametrize("first_call", [0, 2**32 - 5, 2**33 + 2**32 + 1000, 2**62 - 3])
def test_noise_at_philox_counters_past_2_to_32(first_call):
    """The counter's high word: a stream of N normals runs Philox at counters up to N/4, so
    counters ≥ 2**32 only occur past 2**34 elements. The CPU noise block is probed there
    directly and compared with the Python Philox."""
    seed, count = 2**40 + 123, 21  # count: not a multiple of the vector width
    got = ops._philox_normals(_seed(seed), first_call, count)
    calls = torch.arange(first_call, first_call + count, dtype=torch.int64)
    torch.testing.assert_close(got.cpu(), philox_normals(seed, calls), rtol=1e-6, atol=1e-6)


def _leaf(*shape, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=TEST_DEVICE) * scale).requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logvar_shape", [(4, 6), (6,), (2, 4, 6), ()])
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_gradcheck_elbo_loss(reduction, logvar_shape, likelihood):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, device=TEST_DEVICE)
    inputs = (x.requires_grad_(), _leaf(2, 4, 6), _leaf(4, 3), _leaf(4, 3, scale=0.5),
              _leaf(*logvar_shape, scale=0.5), _leaf(3, scale=0.5), _leaf(3, scale=0.5))
    keyword = {"gaussian": "x_logvar", "laplace": "x_logscale"}[likelihood]

    def loss(x, x_hat, mu, logvar, x_log_scale, prior_mu, prior_logvar):
        return fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood=likelihood,
                                 **{keyword: x_log_scale}, prior_mu=prior_mu,
                                 prior_logvar=prior_logvar, beta=0.7, reduction=reduction)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(loss, inputs)


def test_gradcheck_bernoulli_with_free_bits():
    torch.manual_seed(1)
    x = torch.rand(5, 7, dtype=torch.float64, device=TEST_DEVICE).requires_grad_()
    mu = torch.cat([_leaf(5, 2, scale=3.0).detach(), _leaf(5, 2, scale=0.01).detach()], 1)

    def loss(x, logits, mu, logvar):
        return fastvae.elbo_loss(x, logits, mu, logvar, likelihood="bernoulli", free_bits=0.5)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(loss, (x, _leaf(5, 7), mu.requires_grad_(),
                                               _leaf(5, 4, scale=0.1)))


def test_gradcheck_reparameterize():
    def sample(mu, logvar):
        return fastvae.reparameterize(mu, logvar, 3, seed=12345)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(sample, (_leaf(4, 5), _leaf(4, 5, scale=0.5)))


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("need_mu,need_logvar", [(True, True), (True, False), (False, True),
                                                 (False, False)])
def test_reparameterize_backward_matches_reference(samples, need_mu, need_logvar):
    g = torch.Generator(TEST_DEVICE).manual_seed(11)
    logvar = torch.randn(1000, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    grad_z = torch.randn(samples * 1000, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    seed = _seed(2**50 + 3)
    got = ops.reparameterize_backward(grad_z, logvar, seed, samples, need_mu, need_logvar)
    want = reference.reparameterize_backward(grad_z, logvar, seed, samples, need_mu, need_logvar)
    for a, b, needed in zip(got, want, (need_mu, need_logvar)):
        if needed:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert a.numel() == 0


@cpu_only
@pytest.mark.parametrize("features", [2049, 2048])  # rows misaligned / aligned for vector stores
def test_large_outputs_match_reference(features):
    """Outputs past the non-temporal-store threshold (8 MB) take the streaming path."""
    args = elbo_args(batch=1100, latent=8, features=features, samples=1, log_scale="1BD",
                     reduction="sum", seed=7)
    assert args.inputs["x_hat"].nbytes >= 8 << 20
    got = ops.elbo(*args.backend_args())
    want = reference.elbo(*args.backend_args())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _backward_twice(args, through_cpp):
    """Gradients of the leaves in ``args`` after a backward with a random upstream gradient
    and a second one through the retained graph, the native elbo op's autograd recorded by its
    C++ kernel or by _ops.py's Python glue (whose Function calls the same op with grad off)."""
    from fastvae import _ops
    op_args = args.backend_args()
    outputs = ops.elbo.default(*op_args) if through_cpp else \
        _ops._EAGER["elbo"].apply(*op_args, native)
    loss, g = outputs[0], torch.Generator(TEST_DEVICE).manual_seed(5)
    leaves = [t for t in (*args.inputs.values(), args.beta) if t is not None and t.requires_grad]
    found = []
    for _ in range(2):
        loss.backward(torch.randn(loss.shape, generator=g, dtype=loss.dtype, device=TEST_DEVICE),
                      retain_graph=True)
        found.append([t.grad.clone() for t in leaves])
    return found


@pytest.mark.parametrize("options", [
    {"beta_grad": True}, {"reduction": "sum", "beta_grad": True, "prior": "datapoint", "free_bits": 0.2},
    {"reduction": "none", "grad_scale": True, "prior": "datapoint", "log_scale": "1BD"},
    {"reduction": "none", "prior": "shared", "capacity": 1.0}])  # the last recomputes
def test_cpp_autograd_equals_the_python_glue_to_the_bit(options):
    """csrc/autograd.cpp restates _ops.py's backward rules in C++ (the in-place first scaling,
    the rescaled later backward, the recompute, β's gradient): on the same op call both give the
    same gradients, to the bit."""
    cpp = _backward_twice(elbo_args(requires_grad=True, needs="api", **options), True)
    python = _backward_twice(elbo_args(requires_grad=True, needs="api", **options), False)
    for step, (got, want) in enumerate(zip(cpp, python)):
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"backward {step + 1}, leaf {index}"
