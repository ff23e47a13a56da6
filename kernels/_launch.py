"""Launch settings shared by the kernels: interpreter detection, tuning configs, grid sizes."""
import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter must be chosen before kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Programs per streaming multiprocessor for the persistent grids: enough resident programs to
# hide memory latency, few enough that per-program partial sums stay small.
_PROGRAMS_PER_SM = 4
# Under the interpreter every program instance costs milliseconds: a handful of programs, each
# looping over rows, keeps test grids small while still running several row groups.
_INTERPRETER_PROGRAMS = 8


def tuning_configs(gpu_configs, **interpreter_kwargs):
    """The autotune configs: the GPU list, or one config under the interpreter (no timing runs)."""
    if INTERPRETED:
        return [triton.Config(interpreter_kwargs, num_warps=4, num_stages=1)]
    return gpu_configs


def warp_stage_configs(warps=(4, 8), stages=(1, 2, 3)):
    """Configs over num_warps and num_stages (Ampere and Hopper: stages pipeline the row loops)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def accumulation_type(*tensors):
    """float64 when any tensor is float64, else float32 (DESIGN.md §1)."""
    present = [t for t in tensors if t is not None]
    return tl.float64 if any(t.dtype == torch.float64 for t in present) else tl.float32


def torch_accumulation_dtype(*tensors):
    return torch.float64 if accumulation_type(*tensors) == tl.float64 else torch.float32


def resident_programs(device: torch.device) -> int:
    """How many programs a persistent grid launches so every SM stays busy."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
