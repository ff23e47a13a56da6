"""Launch settings shared by the kernels: interpreter detection, launch configs, grid sizes.

Configs are chosen by a heuristic per shape class, so the first call on a new shape costs one
compile and no timing runs (and launches never sync). ``FASTVAE_AUTOTUNE=1`` in the environment
(read at import) wraps the kernels in ``triton.autotune`` over the candidate configs instead:
the first call per key then runs timing launches with host syncs, so warm up before capturing a
CUDA graph.
"""
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from .._common import accumulation_dtype

# Read once, like Triton itself: the interpreter must be chosen before kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("FASTVAE_AUTOTUNE") == "1" and not INTERPRETED

# Programs per streaming multiprocessor for the persistent grids: enough resident programs to
# hide memory latency, few enough that per-program partial sums stay small.
_PROGRAMS_PER_SM = 4
# Under the interpreter every program instance costs milliseconds: a handful of programs, each
# looping over rows, keeps test grids small while still running several row groups.
_INTERPRETER_PROGRAMS = 8
# Programs a non-persistent grid aims at: about two waves of 4 programs on each of the 132 SMs
# of an H100 (no device query on the launch path).
_TARGET_PROGRAMS = 1024


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What the heuristic picks for one launch: meta-parameters, warps and pipeline stages."""
    meta: dict
    num_warps: int = 4
    num_stages: int = 1


def tunable(key, candidates):
    """The kernel itself, or under ``FASTVAE_AUTOTUNE=1`` an autotuner over ``candidates``
    (``triton.Config`` list) keyed by the argument names ``key``."""
    def wrap(kernel):
        if not AUTOTUNE:
            return kernel
        return triton.autotune(configs=candidates, key=key, cache_results=True)(kernel)
    return wrap


def launch(kernel, grid, config: LaunchConfig, *args, **constexprs):
    """Launch with the heuristic ``config``; an autotuned kernel picks its warps, stages and
    the meta-parameters its candidates set, and takes the rest of ``config.meta``."""
    if isinstance(kernel, Autotuner):
        tuned = kernel.configs[0].kwargs
        meta = {name: value for name, value in config.meta.items() if name not in tuned}
        return kernel[grid](*args, **constexprs, **meta)
    return kernel[grid](*args, **constexprs, **config.meta, num_warps=config.num_warps,
                        num_stages=config.num_stages)


def warp_stage_candidates(warps=(4, 8), stages=(1, 2, 3)):
    """Autotune candidates over num_warps and num_stages (stages pipeline the row loops)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def streaming_warps(elements_per_program: int) -> int:
    """Warps for a streaming tile: 8 from 2048 elements, so each thread still moves two 16-byte
    vectors of float32 per tensor; 4 below (fewer idle lanes on small tiles)."""
    return 8 if elements_per_program >= 2048 else 4


def block_for(work: int, smallest: int, largest: int) -> int:
    """A power-of-two block in [smallest, largest] giving about ``_TARGET_PROGRAMS`` programs
    for ``work`` items: small shapes still spread over the SMs, large ones get long blocks.
    The largest block under the interpreter, where programs, not elements, cost time."""
    if INTERPRETED:
        return largest
    per_program = triton.next_power_of_2(max(1, -(-work // _TARGET_PROGRAMS)))
    return max(smallest, min(largest, per_program))


def accumulation_type(*tensors):
    """``fastvae._common.accumulation_dtype`` as a Triton type."""
    return tl.float64 if accumulation_dtype(*tensors) == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def resident_programs(device: torch.device) -> int:
    """How many programs a persistent grid launches so every SM stays busy (cached: a device
    property query per call would cost more than the launch)."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
