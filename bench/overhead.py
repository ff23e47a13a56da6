"""Host overhead per call (``python -m bench.overhead``).

Microseconds per call of forward, backward and forward+backward of ``elbo_loss`` and of
``reparameterize`` on tiny tensors, where the arithmetic is negligible and what remains is
Python, dispatch and autograd: for every fastvae backend on the device, for plain PyTorch and
for torch.compile of it, each with its ratio to plain PyTorch measured in the same rounds. Torch
uses 1 intra-op thread. On CUDA nothing synchronises inside a timed loop (the device catches
up after it), so the figure is what the host spends issuing the work. Also prints the import
time of ``import torch`` against ``import torch, fastvae``, each in fresh interpreters.
"""
import argparse
import functools
import statistics
import subprocess
import sys
import time

import torch

import fastvae

from . import measure, report
from .implementations import fastvae_backends, fastvae_elbo, plain_loss, plain_sample
from .workloads import Case, make_inputs

TINY = Case(batch=4, event=16, latent=4, decoder="x_logvar", dtype="float32")
PHASES = ("forward", "backward", "forward+backward")


def operations(inputs):
    """Per operation: (call(fn) -> output, backward(output)). ``fn`` has the signature of the
    baselines' sampler or loss (see implementations.py)."""
    loss_args = (inputs["x"], inputs["x_hat"], inputs["x_logvar"], None, "gaussian",
                 inputs["mu"], inputs["logvar"])
    return {
        "elbo_loss": (lambda fn: fn(*loss_args), lambda loss: loss.backward()),
        "reparameterize": (lambda fn: fn(inputs["mu"], inputs["logvar"]),
                           lambda z: z.backward(inputs["grad_z"])),
    }


def candidates(device):
    """(name, backend to select or None, sampler, loss) of everything timed."""
    rows = [(f"fastvae-{name}", name, fastvae.reparameterize, fastvae_elbo)
            for name in fastvae_backends(device)]
    rows += [("plain", None, plain_sample, plain_loss),
             ("compiled-plain", None, torch.compile(plain_sample), torch.compile(plain_loss))]
    return rows


def loop_us(run, calls, sync):
    """Host microseconds per call of ``run(calls)``; the device is waited for afterwards."""
    started = time.perf_counter()
    run(calls)
    elapsed = time.perf_counter() - started
    sync()
    return elapsed / calls * 1e6


def phase_us(call, backward, calls, sync):
    """One round: per phase, host µs per call."""
    outputs = []
    forward = loop_us(lambda n: outputs.extend(call() for _ in range(n)), calls, sync)
    backward_only = loop_us(lambda n: [backward(out) for out in outputs], calls, sync)
    both = loop_us(lambda n: [backward(call()) for _ in range(n)], calls, sync)
    return dict(zip(PHASES, (forward, backward_only, both)))


def interleaved_us(entries, calls, rounds, sync):
    """Per entry (call, backward, backend), per phase, the median over ``rounds`` of host µs
    per call. Each round times every entry in turn, so a drift of the machine's speed during
    the run (this VM's drifts by up to a third) reaches every entry alike and their ratios
    stay fair."""
    samples = [[] for _ in entries]
    for _ in range(rounds):
        for (call, backward, backend), own in zip(entries, samples):
            with fastvae.use_backend(backend):
                own.append(phase_us(call, backward, calls, sync))
    return [{phase: statistics.median(s[phase] for s in own) for phase in PHASES}
            for own in samples]


def device_rows(device, args):
    """One row per (operation, implementation) on ``device``; an operation's rows are timed in
    the same rounds, so they share one figure of other processes' load."""
    inputs = make_inputs(TINY, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    implementations = candidates(device)
    rows = []
    for operation, (call, backward) in operations(inputs).items():
        entries = [(functools.partial(call, loss if operation == "elbo_loss" else sample),
                    backward, backend or "auto") for _, backend, sample, loss in implementations]
        interleaved_us(entries, args.calls, 1, sync)  # warm-up: compilation, autotuning
        times, others = measure.least_disturbed(
            lambda: interleaved_us(entries, args.calls, args.rounds, sync), args.attempts,
            args.wait_idle)
        rows += [{"device": device.type, "operation": operation, "implementation": name,
                  **phases, "other_cpu_cores": others}
                 for (name, *_), phases in zip(implementations, times)]
    return rows


def print_tables(rows, env):
    for device, operation in dict.fromkeys((r["device"], r["operation"]) for r in rows):
        table = [dict(r) for r in rows if (r["device"], r["operation"]) == (device, operation)]
        plain = next(r for r in table if r["implementation"] == "plain")
        for row in table:
            row.update({f"{phase} ratio": row[phase] / plain[phase] for phase in PHASES})
        columns = [("implementation", "implementation", "s")]
        for phase, label in zip(PHASES, ("fwd", "bwd", "fwd+bwd")):
            columns += [(f"{label} µs", phase, ".1f"), ("x plain", f"{phase} ratio", ".2f")]
        columns.append(("others' cores", "other_cpu_cores", ".2f"))
        report.print_table(f"{operation}: host µs per call on {device}, tiny tensors "
                           f"({TINY.label()}), {torch.get_num_threads()} torch thread(s); "
                           f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}",
                           columns, table)
        report.warn_if_disturbed(table, "implementations")


def import_seconds(statement, repeats):
    """Median seconds of ``statement`` in fresh interpreters (the first may pay a cold file
    cache, hence the median)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout)
        for _ in range(repeats))


def print_import_times(repeats):
    torch_s = import_seconds("import torch", repeats)
    both_s = import_seconds("import torch, fastvae", repeats)
    print(f"\nimport time, median of {repeats} fresh interpreters: import torch {torch_s:.2f} s; "
          f"import torch, fastvae {both_s:.2f} s (fastvae adds {both_s - torch_s:+.2f} s)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.overhead",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append",
                        help="cpu or cuda; repeatable (default: cpu, and cuda where present)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    parser.add_argument("--rounds", type=int, default=7, help="timed loops per phase")
    parser.add_argument("--import-repeats", type=int, default=3)
    parser.add_argument("--attempts", type=int, default=measure.attempts_default(),
                        help="as for python -m bench")
    parser.add_argument("--wait-idle", type=float, default=measure.wait_idle_default(),
                        metavar="SECONDS", help="as for python -m bench")
    parser.add_argument("--out-dir", type=report.Path, default=report.RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-call cost, not parallel arithmetic
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    env = report.environment("cpu")
    rows = [row for device in devices for row in device_rows(torch.device(device), args)]
    print_tables(rows, env)
    print_import_times(args.import_repeats)
    path = args.out_dir / "overhead.csv"
    report.write_csv([{**env, **row} for row in rows], path)
    print(f"\nCSV: {path}")


if __name__ == "__main__":
    main()
