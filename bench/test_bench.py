"""A small pytest-benchmark subset of the kernel benchmark: forward+backward of
reparameterize + elbo_loss at B=1024, D=3072, d=64, float32, for each implementation.

    pytest bench/ --benchmark-only

Each result's extra_info holds the bandwidth bound and the multiple of it; the full picture
(phases, sweeps, memory, plots) is ``python -m bench``.
"""
import pytest
import torch

from . import measure
from .implementations import all_implementations
from .workloads import Case, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLEMENTATIONS = {impl.name: impl for impl in all_implementations(DEVICE)}
CASES = [Case(1024, 3072, 64, decoder, "float32") for decoder in ("x_logvar", "bernoulli")]


@pytest.fixture(scope="session")
def copy_gbps():
    return measure.copy_bandwidth_gbps(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.decoder)
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_forward_backward(benchmark, copy_gbps, name, case):
    implementation = IMPLEMENTATIONS[name]
    implementation.reset()
    inputs = make_inputs(case, DEVICE)

    def forward_backward():
        measure.backward(*implementation(inputs), inputs["grad_z"])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(forward_backward, setup=lambda: measure.clear_gradients(inputs), rounds=7,
                       warmup_rounds=2)
    bound_ms = case.bound_bytes("forward+backward") / (copy_gbps * 1e9) * 1e3
    benchmark.extra_info.update(copy_gbps=round(copy_gbps, 2), bound_ms=round(bound_ms, 3),
                                x_bound=round(benchmark.stats.stats.median * 1e3 / bound_ms, 2))
