"""Kernel benchmark: reparameterize and elbo_loss, forward / backward / forward+backward, for
every fastvae backend on the device against plain PyTorch, torch.distributions and
torch.compile, side by side in one process, on CPU (wall clock) or CUDA (CUDA events, plus the
replay of the step captured in a CUDA graph). ``python -m bench --help``."""
import argparse

import torch

from . import measure, report
from .implementations import all_implementations
from .workloads import (DECODERS, DTYPES, FULL_BATCHES, FULL_EVENTS, FULL_LATENTS, PARTS,
                        default_cases, gpu_cases, make_inputs, sweep_cases)

MEMORY_HEADROOM = 0.7  # use at most this share of the free memory for one case
PART_LABELS = {"both": "sample+elbo", "elbo": "elbo", "sample": "sample"}


def free_memory_bytes(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="the full sweep over B, D, d, decoder and dtype "
                             "(hours on 2 CPU cores)")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    words = lambda text: text.split(",")  # noqa: E731
    parser.add_argument("--batch", type=ints,
                        help=f"B values, comma-separated (full: {FULL_BATCHES})")
    parser.add_argument("--event", type=ints, help=f"D values (full: {FULL_EVENTS})")
    parser.add_argument("--latent", type=ints, help=f"d values (full: {FULL_LATENTS})")
    parser.add_argument("--decoder", type=words, help=f"of {DECODERS}")
    parser.add_argument("--dtype", type=words, help=f"of {tuple(DTYPES)}")
    parser.add_argument("--impl", type=words,
                        help="only these implementations, e.g. fastvae-native,plain")
    parser.add_argument("--part", type=words,
                        help=f"of {PARTS} (default: both on CPU, elbo,sample on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="keep repeating until this much forward+backward time")
    parser.add_argument("--attempts", type=int, default=measure.attempts_default(),
                        help="measure a run disturbed by other processes again, up to this "
                             "many times in all, and keep the least disturbed (default: "
                             "$FASTVAE_BENCH_ATTEMPTS or 1)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's, one per core)")
    parser.add_argument("--wait-idle", type=float, default=measure.wait_idle_default(),
                        metavar="SECONDS",
                        help="before each run wait up to this long for other processes to "
                             "leave the CPU idle, for shared machines (default: "
                             "$FASTVAE_BENCH_WAIT_IDLE or 0)")
    parser.add_argument("--out-dir", type=report.Path, default=report.RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def selected_cases(args, device):
    sweep_flags = (args.batch, args.event, args.latent, args.decoder, args.dtype)
    if not args.full and all(flag is None for flag in sweep_flags):
        return gpu_cases() if device.type == "cuda" else default_cases()
    # --full, or a custom sweep: flags not given take the full sweep's values with --full,
    # else the default case's (D=3072, d=64, x_logvar, float32; B from the default sweep).
    defaults = ((FULL_BATCHES, FULL_EVENTS, FULL_LATENTS, DECODERS, tuple(DTYPES)) if args.full
                else ((256, 1024, 4096), (3072,), (64,), ("x_logvar",), ("float32",)))
    return sweep_cases(*(flag or default for flag, default in zip(sweep_flags, defaults)))


def benchmark_case(case, part, implementation, device, clock, args):
    """Result rows (one per phase) of one implementation on one case."""
    inputs = make_inputs(case, device)
    implementation.reset()
    first_ms = measure.first_call_ms(implementation, inputs, clock)
    measure.first_call_ms(implementation, inputs, clock)  # warm-up
    saved, saved_extra = measure.saved_for_backward_bytes(implementation, inputs)
    with torch.no_grad():
        loss = implementation(inputs)[0]  # checked against the other implementations
    peak = measure.peak_memory_bytes(implementation, inputs, clock)
    samples, other_cores = measure.least_disturbed(
        lambda: measure.time_phases(implementation, inputs, clock, args.min_reps,
                                    args.min_seconds), args.attempts, args.wait_idle)
    graph = graph_fields(implementation, inputs, clock)
    rows = []
    for phase in measure.PHASES:
        stats = measure.summarise(samples[phase])
        bound_bytes = case.bound_bytes(phase, part)
        rows.append({"phase": phase, **stats, "bound_bytes": bound_bytes,
                     "gbps": bound_bytes / (stats["median_ms"] * 1e-3) / 1e9,
                     "peak_mem_bytes": peak, "saved_bytes": saved,
                     "saved_extra_bytes": saved_extra, "first_call_ms": first_ms,
                     "other_cpu_cores": other_cores, "loss": None if loss is None else float(loss),
                     **(graph if phase == "forward+backward" else {})})
    return rows


def graph_fields(implementation, inputs, clock):
    """On CUDA, the forward+backward step replayed from a CUDA graph: its median ms, or why
    it could not be captured."""
    if not clock.cuda:
        return {}
    if not implementation.capturable:
        return {"graph_error": "not capturable (host sync)"}
    times, error = measure.graph_replay_ms(implementation, inputs, clock)
    return {"graph_error": error} if times is None else {
        "graph_ms": measure.summarise(times)["median_ms"]}


def run_all(cases, parts, implementations, device, clock, copy_gbps, args):
    """Rows of every (part, case, implementation), and the runs skipped for memory."""
    rows, skipped = [], []
    jobs = [(part, case, impl) for part in parts for case in cases
            for impl in implementations[part]]
    for part, case, implementation in report.progress(jobs, "kernels"):
        needed = implementation.peak_batch_by_event_tensors * case.batch_by_event_bytes()
        if needed > MEMORY_HEADROOM * free_memory_bytes(device):
            skipped.append(f"{implementation.name} at {case.label()} "
                           f"(needs ~{needed / 2**30:.1f} GiB)")
            continue
        for row in benchmark_case(case, part, implementation, device, clock, args):
            bound_ms = row["bound_bytes"] / (copy_gbps * 1e9) * 1e3
            rows.append({"part": part, "batch": case.batch, "event": case.event,
                         "latent": case.latent, "decoder": case.decoder, "dtype": case.dtype,
                         "series": f"{part}_{case.series()}",
                         "implementation": implementation.name,
                         **row, "bound_ms": bound_ms, "x_bound": row["median_ms"] / bound_ms})
    return rows, skipped


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = measure.Clock(device)
    env = report.environment(device)
    parts = args.part or (("elbo", "sample") if device.type == "cuda" else ("both",))
    implementations = {part: [impl for impl in all_implementations(device, part)
                              if args.impl is None or impl.name in args.impl] for part in parts}
    cases = selected_cases(args, device)
    copy_gbps, copy_others = measure.least_disturbed(
        lambda: measure.copy_bandwidth_gbps(device), args.attempts, args.wait_idle)
    print_header(env, copy_gbps, copy_others, cases, implementations)
    rows, skipped = run_all(cases, parts, implementations, device, clock, copy_gbps, args)
    rows = [{**env, "copy_gbps": copy_gbps, "copy_other_cpu_cores": copy_others, **row}
            for row in rows]
    tag = (report.allocator_tag() if device.type == "cpu" else device.type) + (
        "_full" if args.full else "")
    csv_path = args.out_dir / f"kernels_{tag}.csv"
    report.write_csv(rows, csv_path)
    print_summary(rows, copy_gbps, env, clock.cuda)
    for line in skipped:
        print(f"skipped (memory estimate): {line}")
    for line in disagreements(rows):
        print(f"WARNING: {line}")
    plots = [] if args.no_plots else report.plot_batch_sweeps(rows, args.out_dir, tag, copy_gbps)
    print(f"\nCSV: {csv_path}")
    for path in plots:
        print(f"plot: {path}")
    return rows


def print_header(env, copy_gbps, copy_others, cases, implementations):
    names = [impl.name for impl in next(iter(implementations.values()))]
    print(f"{env['cpu']}, {env['cores']} cores ({env['torch_threads']} torch threads), "
          f"device {env['device']}, allocator "
          f"{env['allocator']}; torch {env['torch']}, fastvae {env['fastvae']} (backends: "
          f"{env['backends']}), python {env['python']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (other processes used "
          f"{copy_others or 0:.2f} cores meanwhile); {len(cases)} cases x {len(implementations)} "
          f"parts ({', '.join(implementations)}) x {len(names)} implementations: "
          f"{', '.join(names)}")


def disagreements(rows):
    """Cases where an implementation's loss differs from plain PyTorch's beyond rounding."""
    tolerance = {"float32": 1e-4, "bfloat16": 2e-2}
    plain = {row["series"] + str(row["batch"]): row["loss"] for row in rows
             if row["implementation"] == "plain" and row["loss"] is not None}
    for row in rows:
        reference = plain.get(row["series"] + str(row["batch"]))
        if (row["phase"] == "forward+backward" and reference is not None
                and row["loss"] is not None
                and abs(row["loss"] - reference) > tolerance[row["dtype"]] * abs(reference)):
            yield (f"{row['implementation']} gives loss {row['loss']:.6g} at {row['series']} "
                   f"B={row['batch']}, plain PyTorch {reference:.6g}")


def print_summary(rows, copy_gbps, env, cuda):
    by_run = {}
    for row in rows:
        summary = by_run.setdefault((row["series"], row["batch"], row["implementation"]), {})
        summary[row["phase"]] = row["median_ms"]
        if row["phase"] == "forward+backward":
            summary.update(summary_row(row))
    runs = list(by_run.values())
    ms = ".3f" if cuda else ".1f"  # GPU steps take fractions of a millisecond
    columns = [("case", "case", "s"), ("implementation", "implementation", "s"),
               ("fwd ms", "forward", ms), ("bwd ms", "backward", ms),
               ("fwd+bwd ms", "forward+backward", ms), ("p20-p80", "spread", "s")]
    if cuda:
        columns.append(("graph ms", "graph_ms", ms))
    columns += [("bound ms", "bound_ms", ms), ("GB/s", "gbps", ".1f"),
                ("x bound", "x_bound", ".2f" if cuda else ".1f"),
                ("1st call ms", "first_call_ms", ".0f"), ("peak MiB", "peak_mib", ".0f"),
                ("saved MiB", "saved_mib", ".0f"), ("others' cores", "other_cpu_cores", ".2f")]
    report.print_table(f"median times on {env['device']} ({env['cpu']}, {env['cores']} cores, "
                       f"{env['torch_threads']} torch threads), allocator "
                       f"{env['allocator']}, copy bandwidth {copy_gbps:.1f} GB/s, {env['date']}",
                       columns, runs)
    print("x bound = fwd+bwd median / (bytes read and written once / copy bandwidth); peak = "
          "rise of resident memory (CPU) or allocated bytes (CUDA) in one fwd+bwd; saved = "
          "bytes saved for backward beyond the inputs' own storage; 1st call = the first "
          "fwd+bwd on the case (compilation, autotuning); others' cores = CPU used by other "
          "processes while timing (noise: anything above ~0.1 disturbs 2 cores)."
          + (" graph = one replay of the fwd+bwd captured in a CUDA graph (device time "
             "without host overhead)." if cuda else ""))
    for run in runs:
        if run.get("graph_error"):
            print(f"no CUDA graph for {run['implementation']} at {run['case']}: "
                  f"{run['graph_error']}")
    report.warn_if_disturbed(runs, "runs")


def summary_row(row):
    """The table's cells of one run, from its forward+backward row."""
    case = (f"{row['dtype']} B={row['batch']} d={row['latent']}" if row["part"] == "sample"
            else f"{row['dtype']} {row['decoder']} B={row['batch']} D={row['event']} "
                 f"d={row['latent']}")
    return {"case": f"{PART_LABELS[row['part']]} {case}", "implementation": row["implementation"],
            "spread": f"{row['p20_ms']:.3g}-{row['p80_ms']:.3g}", "gbps": row["gbps"],
            "x_bound": row["x_bound"], "bound_ms": row["bound_ms"],
            "first_call_ms": row["first_call_ms"], "graph_ms": row.get("graph_ms"),
            "graph_error": row.get("graph_error"),
            "peak_mib": None if row["peak_mem_bytes"] is None else row["peak_mem_bytes"] / 2**20,
            "saved_mib": row["saved_extra_bytes"] / 2**20,
            "other_cpu_cores": row["other_cpu_cores"]}


if __name__ == "__main__":
    main()
