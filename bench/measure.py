"""Timing, copy bandwidth, peak memory and saved-for-backward bytes, on CPU or CUDA.

CPU ops run synchronously, so a wall clock around them is exact; on CUDA the same code
records CUDA events and synchronises only after each repetition.
"""
import ctypes
import os
import time

import numpy as np
import torch

from .workloads import leaves

PHASES = ("forward", "backward", "forward+backward")
NOISY_OTHER_CORES = 0.1  # other processes' CPU use (cores) above which a timing is suspect


class Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def milliseconds(self, start, end):
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def copy_bandwidth_gbps(device, nbytes=512 * 2**20, reps=10):
    """Device copy bandwidth in GB/s (1e9 bytes/s, bytes read + bytes written) of
    ``dst.copy_(src)`` on buffers well beyond the last-level cache, touched before timing so
    no page faults are counted; the median of ``reps`` copies."""
    clock = Clock(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start = clock.mark()
        dst.copy_(src)
        times.append(clock.milliseconds(start, clock.mark()))
    return 2 * nbytes / (np.median(times) * 1e-3) / 1e9


def backward(loss, z, grad_z):
    """Backward from whichever of the loss (upstream 1) and z exist. The decoder is not part
    of the workload: grad_z stands for what it would send back to z."""
    pairs = [(tensor, grad) for tensor, grad in ((loss, None), (z, grad_z)) if tensor is not None]
    torch.autograd.backward(*zip(*pairs))


def clear_gradients(inputs):
    """Set the gradients to None, as ``optimizer.zero_grad()`` does, so that every backward
    writes fresh gradients."""
    for leaf in leaves(inputs):
        leaf.grad = None


def _forward_backward(implementation, inputs, clock):
    """One timed forward and backward, the gradients cleared first (outside the timing)."""
    clear_gradients(inputs)
    start = clock.mark()
    loss, z = implementation(inputs)
    middle = clock.mark()
    backward(loss, z, inputs["grad_z"])
    end = clock.mark()
    forward = clock.milliseconds(start, middle)
    return forward, clock.milliseconds(middle, end), clock.milliseconds(start, end)


def graph_replay_ms(implementation, inputs, clock, reps=20):
    """CUDA: ``(milliseconds per replay, None)`` of one forward+backward captured in a CUDA
    graph, i.e. the device time without the host's per-call cost; ``(None, reason)`` where the
    step cannot be captured. Warm-up runs on a side stream, as torch.cuda.graphs asks."""
    def step():
        backward(*implementation(inputs), inputs["grad_z"])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            clear_gradients(inputs)
            step()
    torch.cuda.current_stream().wait_stream(side)
    clear_gradients(inputs)  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:
        return None, str(error).splitlines()[0]
    times = []
    for _ in range(reps):
        start = clock.mark()
        graph.replay()
        times.append(clock.milliseconds(start, clock.mark()))
    clear_gradients(inputs)
    return times, None


def time_phases(implementation, inputs, clock, min_reps=7, min_seconds=1.0, max_reps=50):
    """Per phase: the list of milliseconds over the repetitions; repeats until at least
    ``min_reps`` and ``min_seconds`` of forward+backward, or ``max_reps``."""
    samples = {phase: [] for phase in PHASES}
    while True:
        for phase, ms in zip(PHASES, _forward_backward(implementation, inputs, clock)):
            samples[phase].append(ms)
        reps, total = len(samples["forward+backward"]), sum(samples["forward+backward"]) / 1e3
        if reps >= max_reps or (reps >= min_reps and total >= min_seconds):
            return samples


def summarise(milliseconds):
    p20, median, p80 = np.percentile(milliseconds, [20, 50, 80])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": len(milliseconds)}


def first_call_ms(implementation, inputs, clock):
    """The first forward+backward: for torch.compile this includes compilation."""
    return _forward_backward(implementation, inputs, clock)[2]


def _release_free_heap():
    """Hand the allocator's free memory back to the OS, so that memory reused within the next
    call shows up in the resident-set high-water mark."""
    process = ctypes.CDLL(None)
    for name in ("MallocExtension_ReleaseFreeMemory", "malloc_trim"):  # tcmalloc, glibc
        function = getattr(process, name, None)
        if function is not None:
            function(*([0] if name == "malloc_trim" else []))


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_bytes(implementation, inputs, clock):
    """Peak memory of one forward+backward above what was in use before it, gradients
    included. CUDA: the caching allocator's peak of allocated bytes. CPU: the rise of the
    process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) after
    the allocator's free memory is handed back to the OS; None where /proc does not allow it."""
    clear_gradients(inputs)
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _forward_backward(implementation, inputs, clock)
        return torch.cuda.max_memory_allocated() - before
    try:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        _forward_backward(implementation, inputs, clock)
        return (_status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError):
        return None


def saved_for_backward_bytes(implementation, inputs):
    """(all, extra): bytes of the distinct storages the forward pass saves for backward, and
    of those that are not storages of the inputs themselves (the memory the autograd graph
    adds), seen through ``torch.autograd.graph.saved_tensors_hooks``."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        implementation(inputs)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    input_storages = {t.untyped_storage().data_ptr() for t in inputs.values()
                      if isinstance(t, torch.Tensor)}
    extra = sum(n for pointer, n in storages.items() if pointer not in input_storages)
    return sum(storages.values()), extra


class OtherProcessesLoad:
    """Cores kept busy by other processes between ``start()`` and ``stop()`` (Linux /proc):
    with 2 cores, another busy process makes every 2-thread parallel region wait for a time
    slice, so each result row records this as a noise indicator."""

    def __init__(self):
        self.ticks_per_second = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy_ticks():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle, iowait = fields[3], fields[4]
        return sum(fields[:8]) - idle - iowait  # user..steal, without idle and iowait

    @staticmethod
    def _own_ticks():
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def start(self):
        self._started = (time.perf_counter(), self._busy_ticks(), self._own_ticks())

    def stop(self):
        """Average number of cores used by other processes since ``start()``; None off Linux."""
        seconds = time.perf_counter() - self._started[0]
        others = (self._busy_ticks() - self._started[1]) - (self._own_ticks() - self._started[2])
        return max(others, 0) / self.ticks_per_second / seconds


def wait_idle_default():
    return float(os.environ.get("FASTVAE_BENCH_WAIT_IDLE", "0"))


def attempts_default():
    return int(os.environ.get("FASTVAE_BENCH_ATTEMPTS", "1"))


def wait_until_idle(max_seconds, threshold, window=1.0):
    """Wait (at most ``max_seconds``) for a ``window`` in which other processes use fewer
    than ``threshold`` cores; returns the seconds waited."""
    load = other_processes_load()
    started = time.perf_counter()
    while load is not None and time.perf_counter() - started < max_seconds:
        load.start()
        time.sleep(window)
        if load.stop() < threshold:
            break
    return time.perf_counter() - started


def other_processes_load():
    try:
        return OtherProcessesLoad()
    except (OSError, ValueError):
        return None


def least_disturbed(run, attempts=1, wait_idle=0.0):
    """``(result, other_cores)`` of the call of ``run()`` least disturbed by other processes:
    a call during which they used the CPU is repeated, up to ``attempts`` calls in all, each
    after waiting up to ``wait_idle`` seconds for an idle CPU."""
    best = None
    for _ in range(attempts):
        wait_until_idle(wait_idle, NOISY_OTHER_CORES)
        load = other_processes_load()
        if load is not None:
            load.start()
        result = run()
        others = None if load is None else load.stop()
        if best is None or (others or 0) < (best[1] or 0):
            best = (result, others)
        if others is None or others <= NOISY_OTHER_CORES:
            break
    return best
