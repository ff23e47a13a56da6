"""Where and how results are written: the run's environment, CSV, terminal table, plots."""
import csv
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import fastvae

from .measure import NOISY_OTHER_CORES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PART_TITLES = {"both": "reparameterize + elbo_loss", "elbo": "elbo_loss",
               "sample": "reparameterize"}


def allocator():
    """The C allocator of this process: an LD_PRELOADed one by its library name, else glibc's
    (with its tuning variables when set)."""
    for library in os.environ.get("LD_PRELOAD", "").split():
        name = Path(library).name
        for known in ("tcmalloc", "jemalloc", "mimalloc"):
            if known in name:
                return known
    tuning = [f"{key}={os.environ[key]}" for key in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
              if key in os.environ]
    return "glibc" + (f" ({' '.join(tuning)})" if tuning else "")


def allocator_tag():
    return allocator().split()[0] + ("-tuned" if "(" in allocator() else "")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment(device):
    """What the numbers depend on, recorded in every CSV row."""
    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "allocator": allocator(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastvae": f"{fastvae.__version__}+{_git_commit()}",
        "backends": " ".join(fastvae.available_backends(device)),
    }


def write_csv(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def print_table(title, columns, rows, file=sys.stdout):
    """``columns``: (header, key, format) triples; a missing value prints as '-'."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else format(row[key], fmt))
                      for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}", file=file)
    for index, line in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)), file=file)
        if index == 0:
            print("  ".join("-" * width for width in widths), file=file)


def warn_if_disturbed(rows, what, file=sys.stdout):
    """The warning under every table: rows measured while other processes used the CPU
    (``other_cpu_cores`` above NOISY_OTHER_CORES) have inflated times."""
    noisy = [row["other_cpu_cores"] for row in rows
             if (row.get("other_cpu_cores") or 0) > NOISY_OTHER_CORES]
    if noisy:
        print(f"WARNING: other processes kept up to {max(noisy):.1f} cores busy during "
              f"{len(noisy)} of {len(rows)} {what}: those times are inflated; re-run on an idle "
              "machine (bench/README.md, Noise).", file=file)


def progress(items, desc):
    """Yield ``items``, counting them on stderr (the tables go to stdout)."""
    end = "\r" if sys.stderr.isatty() else "\n"
    for index, item in enumerate(items, 1):
        print(f"{desc}: {index}/{len(items)}", end=end, file=sys.stderr, flush=True)
        yield item
    if end == "\r":
        print(file=sys.stderr)


def plot_batch_sweeps(rows, out_dir, tag, copy_gbps, phase="forward+backward"):
    """One PNG per series with several batch sizes: median time (20th–80th percentile bars)
    and GB/s against B, one line per implementation, the bandwidth bound dashed, points
    measured while other processes used the CPU circled in red. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")

    rows = [row for row in rows if row["phase"] == phase]
    paths = []
    for series in sorted({row["series"] for row in rows}):
        series_rows = [row for row in rows if row["series"] == series]
        if len({row["batch"] for row in series_rows}) > 1:
            path = out_dir / f"kernels_{tag}_{series}.png"
            _plot_series(series_rows, copy_gbps, phase, path)
            paths.append(path)
    return paths


def _plot_series(series_rows, copy_gbps, phase, path):
    import matplotlib.pyplot as plt

    figure, (time_axis, rate_axis) = plt.subplots(1, 2, figsize=(12, 4.8))
    any_disturbed = False
    for name in dict.fromkeys(row["implementation"] for row in series_rows):
        points = sorted((row["batch"], row) for row in series_rows
                        if row["implementation"] == name)
        any_disturbed |= _plot_implementation(time_axis, rate_axis, name, points,
                                              label_disturbed=not any_disturbed)
    bound = {row["batch"]: row["bound_ms"] for row in series_rows}
    batches = sorted(bound)
    time_axis.plot(batches, [bound[b] for b in batches], "k--", label="bandwidth bound")
    rate_axis.axhline(copy_gbps, color="k", linestyle="--",
                      label=f"copy bandwidth {copy_gbps:.1f} GB/s")
    _style_axes(time_axis, rate_axis, batches, phase)
    first = series_rows[0]
    figure.suptitle(f"{PART_TITLES[first.get('part', 'both')]}, {phase}: D={first['event']} "
                    f"d={first['latent']} {first['decoder']} {first['dtype']} on "
                    f"{first['device']} ({first['allocator']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_implementation(time_axis, rate_axis, name, points, label_disturbed):
    """One implementation's line on both axes; returns whether any point was disturbed."""
    x = [batch for batch, _ in points]
    median = [row["median_ms"] for _, row in points]
    errors = [[row["median_ms"] - row["p20_ms"] for _, row in points],
              [row["p80_ms"] - row["median_ms"] for _, row in points]]
    time_axis.errorbar(x, median, yerr=errors, marker="o", capsize=3, label=name)
    rate_axis.plot(x, [row["gbps"] for _, row in points], marker="o", label=name)
    disturbed = [(batch, row) for batch, row in points
                 if (row["other_cpu_cores"] or 0) > NOISY_OTHER_CORES]
    for axis, key in ((time_axis, "median_ms"), (rate_axis, "gbps")) if disturbed else ():
        axis.scatter([b for b, _ in disturbed], [row[key] for _, row in disturbed],
                     s=120, facecolors="none", edgecolors="red", zorder=3,
                     label="disturbed by other processes" if label_disturbed else None)
    return bool(disturbed)


def _style_axes(time_axis, rate_axis, batches, phase):
    import matplotlib.ticker

    for axis, ylabel in ((time_axis, f"{phase} time, ms (median)"),
                         (rate_axis, "GB/s (bound bytes / median time)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch size B")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    rate_axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    rate_axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    rate_axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def read_csv(path):
    """Rows of a kernels CSV with their numbers as numbers (empty cells as None)."""
    def value(text):
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    with open(path, newline="") as handle:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(handle)]


if __name__ == "__main__":
    # Re-draw the plots of a kernels CSV: python -m bench.report bench/results/kernels_glibc.csv
    for csv_path in map(Path, sys.argv[1:]):
        csv_rows = read_csv(csv_path)
        csv_tag = csv_path.stem.removeprefix("kernels_")
        for png in plot_batch_sweeps(csv_rows, csv_path.parent, csv_tag, csv_rows[0]["copy_gbps"]):
            print(f"plot: {png}")
