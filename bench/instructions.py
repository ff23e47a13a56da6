"""Instructions per call (``python -m bench.instructions``): the host overhead of
``bench.overhead`` counted by valgrind's callgrind instead of timed.

A VM's speed drifts between runs (and within one), so per-call times only compare within a
run. An instruction count does not drift: it compares across runs and commits, the way a
deterministic profiler count does. It is not time (the interpreter runs fewer instructions
per cycle than compiled kernels), so it complements ``bench.overhead``'s µs, it does not
replace them. Each (operation, implementation) runs in its own valgrind process, which counts
only the timed loop (collection toggled around it); that takes about a minute each,
as many at once as there are cores. Valgrind
emulates no AVX-512, so the native kernels run their AVX2 copy there.
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

import torch

import fastvae

from . import report
from .overhead import TINY, operations
from .implementations import fastvae_elbo, plain_loss, plain_sample
from .workloads import make_inputs

# implementation -> (backend to select or None, sampler, loss); a subset of bench.overhead's
# (torch.compile's run would count its compilation in the warm-up only, but takes minutes).
IMPLEMENTATIONS = {"fastvae-native": ("native", fastvae.reparameterize, fastvae_elbo),
                   "plain": (None, plain_sample, plain_loss)}


def count_loop(operation, implementation, calls):
    """In the valgrind child: warm up, then run ``calls`` forward+backward calls with
    callgrind's collection on."""
    torch.set_num_threads(1)
    backend, sample, loss = IMPLEMENTATIONS[implementation]
    call, backward = operations(make_inputs(TINY, torch.device("cpu")))[operation]
    fn = loss if operation == "elbo_loss" else sample
    with fastvae.use_backend(backend or "auto"):
        for _ in range(50):
            backward(call(fn))
        torch._C._valgrind_toggle()
        for _ in range(calls):
            backward(call(fn))
        torch._C._valgrind_toggle()


def instructions_per_call(operation, implementation, calls):
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.instructions",
               "--child", operation, implementation, "--calls", str(calls)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    collected = re.search(r"Collected\s*:\s*([\d,]+)", result.stderr)
    if collected is None:
        raise RuntimeError(f"no callgrind count in:\n{result.stderr[-2000:]}")
    return int(collected.group(1).replace(",", "")) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="counted calls per row")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "IMPLEMENTATION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        count_loop(*args.child, args.calls)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench.instructions needs valgrind (apt-get install valgrind)")
    env = report.environment("cpu")
    pairs = [(operation, name) for operation in operations(make_inputs(TINY, torch.device("cpu")))
             for name in IMPLEMENTATIONS]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # counts do not mind
        counts = dict(zip(pairs, pool.map(lambda pair: instructions_per_call(*pair, args.calls),
                                          pairs)))
    for operation in dict.fromkeys(operation for operation, _ in pairs):
        rows = [{"implementation": name, "instructions": counts[operation, name]}
                for name in IMPLEMENTATIONS]
        plain = next(r["instructions"] for r in rows if r["implementation"] == "plain")
        for row in rows:
            row["ratio"] = row["instructions"] / plain
        report.print_table(f"{operation} forward+backward: instructions per call under "
                           f"callgrind, tiny tensors ({TINY.label()}), 1 thread; "
                           f"{env['cpu']}, torch {env['torch']}, fastvae {env['fastvae']}",
                           [("implementation", "implementation", "s"),
                            ("instructions", "instructions", ",.0f"),
                            ("x plain", "ratio", ".2f")], rows)


if __name__ == "__main__":
    main()
