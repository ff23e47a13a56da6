"""Scripted mutation testing of the native (C++) and Triton code, and of the input checks and
option handling the issue-14 misses were in.

Not part of CI (each C++ mutant costs a rebuild); run it before each release of the test suite,
from a clone whose working tree may be modified (it edits, rebuilds and restores files)::

    python tests/mutation/mutants.py              # every mutant
    python tests/mutation/mutants.py --list       # names, files, selected tests
    python tests/mutation/mutants.py native_free_bits_boundary triton_laplace_sign_at_zero

Each mutant is one exact text replacement in one file. The script applies it, rebuilds
``fastvae._C`` when the file is under csrc/ (``python setup.py build_ext --inplace``), runs the
mutant's tests with ``pytest -x -q`` (Triton mutants under ``TRITON_INTERPRET=1
FASTVAE_TEST_BACKENDS=triton``) and records the mutant as killed (the tests failed) or survived
(they passed), then restores the file's original text, always, also on an error or Ctrl-C. The
extension is rebuilt from the restored sources before the next non-C++ mutant and at the end.
A mutant whose text is no longer found (the code moved) is reported as "stale", never as killed:
update its entry. Exit status 0 when every mutant was killed.

The Python layers (fastvae/_validation.py, functional.py, _ops.py, backends/reference.py) are
mutated by mutmut instead: see mutmut-setup.cfg here for the command, and mutmut-equivalent.txt
for the surviving mutants judged equivalent (or observable only on CUDA or under torch.compile),
one line of reason each.

The tests import the package of this checkout: the script puts the repository root first on
PYTHONPATH; for Triton mutants ``fastvae.kernels`` must resolve to this checkout's kernels/
(an editable install of it, or a link fastvae/kernels -> ../kernels), which the script checks.
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]

NATIVE = {"FASTVAE_TEST_BACKENDS": "native"}
TRITON = {"FASTVAE_TEST_BACKENDS": "triton", "TRITON_INTERPRET": "1"}
REFERENCE_AND_NATIVE = {"FASTVAE_TEST_BACKENDS": "reference,native"}


@dataclass
class Mutant:
    name: str
    file: str           # relative to the repository root
    old: str            # exact text, found exactly once in the file
    new: str
    tests: tuple        # pytest arguments (files, -k expressions)
    env: dict
    why: str = ""       # the bug it stands for

    @property
    def native(self):
        return self.file.startswith("csrc/")


MUTANTS = [
    # ---- the five misses of issue 14 -----------------------------------------------------------
    Mutant("x_logvar_dtype_check_deleted", "fastvae/functional.py",
           "        check_float_tensor(log_name, log_value)\n", "",
           ("tests/test_validation.py",), REFERENCE_AND_NATIVE,
           "an integer x_logvar / x_logscale is accepted (reference) or fails in C++ (native)"),
    Mutant("beta_grad_from_kl_before_free_bits", "fastvae/_ops.py",
           "    kl_term = output[3] if", "    kl_term = output[2] if",
           ("tests/test_elbo.py", "tests/test_terms.py"), REFERENCE_AND_NATIVE,
           "dβ taken from the KL rather than the free-bits-clamped kl_term"),
    Mutant("native_shared_prior_partials_overwritten", "csrc/cpu/kl.cpp",
           "p_.prior_per_row ? prior_grads[g - 2] : load_as<T>(grads_[g] + i) + prior_grads[g - 2]",
           "prior_grads[g - 2]",
           ("tests/test_op_contract.py", "tests/test_elbo.py", "tests/test_native.py"), NATIVE,
           "a prior shared by the batch: each chunk keeps only its last row's gradient"),
    Mutant("native_free_bits_boundary", "csrc/cpu/kl.cpp",
           "flags[j] = batch_mean >= threshold ?", "flags[j] = batch_mean > threshold ?",
           ("tests/test_elbo.py", "tests/test_terms.py"), NATIVE,
           "a dim whose batch-mean KL equals λ exactly is treated as inactive"),
    Mutant("native_philox_counter_high_word_dropped", "csrc/philox.h",
           "  c1 = static_cast<uint32_t>(offset >> 32);\n", "  c1 = 0;\n",
           ("tests/test_native.py", "tests/test_reparameterize.py"), NATIVE,
           "the noise repeats after 2**32 Philox calls"),
    # ---- more plausible native bugs -------------------------------------------------------------
    Mutant("native_laplace_sign_at_zero", "csrc/cpu/vec_math_ops.h",
           "return x.gt(V(S(0))) - x.lt(V(S(0)));", "return x.ge(V(S(0))) - x.lt(V(S(0)));",
           ("tests/test_terms.py", "tests/test_elbo.py"), NATIVE,
           "sign(0) = 1: the Laplace gradient at a zero residual is ±1/b instead of 0"),
    Mutant("native_scale_skips_rows_below_one", "csrc/cpu/scale.cpp",
           "if (factor == acc_t(1)) continue;", "if (factor <= acc_t(1)) continue;",
           ("tests/test_backward_scaling.py", "tests/test_op_contract.py"), NATIVE,
           "scale_'s early exit on the wrong condition: rows with upstream < 1 are left unscaled"),
    Mutant("native_theta_grad_over_batch_not_summed", "csrc/cpu/nll_worker.h",
           "store_as(load_as<T>(out.grad_log_scale + i) + weighted, out.grad_log_scale + i);",
           "store_as(weighted, out.grad_log_scale + i);",
           ("tests/test_elbo.py", "tests/test_terms.py", "tests/test_op_contract.py"), NATIVE,
           "a θ broadcast over B gets one row's gradient, not the sum over rows"),
    Mutant("native_scalar_theta_partials_overwritten", "csrc/cpu/nll_worker.h",
           "partial_[p_.scale_per_sample() ? s : 0] += scale_row_sums_[s];",
           "partial_[p_.scale_per_sample() ? s : 0] = scale_row_sums_[s];",
           ("tests/test_elbo.py", "tests/test_terms.py", "tests/test_op_contract.py"), NATIVE,
           "a θ of one value per sample: the chunk partial keeps only its last row"),
    # ---- Triton -------------------------------------------------------------------------------
    Mutant("triton_laplace_sign_at_zero", "kernels/likelihoods.py",
           "tl.where(residual < 0.0, -1.0, 0.0)", "tl.where(residual < 0.0, -1.0, 1.0)",
           ("tests/test_terms.py", "-k", "laplace"), TRITON,
           "sign(0) = 1 in the Triton Laplace gradient"),
    Mutant("triton_nll_mask_dropped", "kernels/elbo.py",
           "tl.sum(tl.sum(tl.where(valid, nll, 0.0), axis=1), axis=0)",
           "tl.sum(tl.sum(nll, axis=1), axis=0)",
           ("tests/test_terms.py", "-k", "gaussian_nll or laplace_nll"), TRITON,
           "padding lanes of a partial tile add their NLL to the row"),
    Mutant("triton_free_bits_boundary", "kernels/elbo.py",
           "return column_sum / batch >= floor", "return column_sum / batch > floor",
           ("tests/test_elbo.py", "-k", "free_bits"), TRITON,
           "a dim whose batch-mean KL equals λ exactly is treated as inactive"),
    Mutant("triton_theta_grad_over_batch_not_summed", "kernels/elbo.py",
           "            theta_columns += d_theta\n", "            theta_columns = d_theta\n",
           ("tests/test_triton.py", "-k", "every_log_scale_layout"), TRITON,
           "a θ broadcast over B gets the last row's gradient, not the sum over rows"),
    Mutant("triton_scale_skips_rows_below_one", "kernels/scale.py",
           "        if upstream != 1.0:\n", "        if upstream > 1.0:\n",
           ("tests/test_op_contract.py", "-k", "scale"), TRITON,
           "scale_'s early exit on the wrong condition: upstream < 1 is left unscaled"),
]


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


def build(log):
    """Rebuilds fastvae._C in place; False (with the log kept) when it fails."""
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    return result.returncode == 0


def run_tests(mutant, log, timeout):
    env = {**os.environ, **mutant.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *mutant.tests]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    # pytest: 0 all passed, 1 some failed; anything else (collection or usage error, nothing
    # collected) says nothing about the mutant.
    return {0: "survived", 1: "killed"}.get(result.returncode, f"error (pytest {result.returncode})")


def check_imports(need_triton):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = "import fastvae; print(fastvae.__file__)"
    if need_triton:
        script += "\nimport fastvae.kernels as k; print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    for line in out.stdout.split():
        if not pathlib.Path(line).resolve().is_relative_to(ROOT.resolve()):
            sys.exit(f"{line} is outside {ROOT}: the tests would not see the mutants")
    if out.returncode:
        sys.exit(out.stderr)


class Extension:
    """fastvae._C, and whether it was last built from mutated C++ sources: such a build stays in
    place (saving a rebuild between C++ mutants) until a mutant outside csrc/ needs the clean one
    or the run ends."""

    def __init__(self):
        self.mutated = False

    def build_mutant(self, log):
        self.mutated = True
        return build(log)

    def restore(self, log):
        """Rebuilds from the clean sources where needed; False when that build fails."""
        if self.mutated:
            if not build(log):
                return False
            self.mutated = False
        return True


def mutate_and_test(mutant, original, log, timeout, extension):
    """The mutant's outcome with its text written in its file (the caller restores the file)."""
    if not mutant.native and not extension.restore(log):  # before the mutant is written
        raise RuntimeError(f"the restored sources do not build: {log.name}")
    (ROOT / mutant.file).write_text(original.replace(mutant.old, mutant.new))
    if mutant.native and not extension.build_mutant(log):
        return "build error"
    log.flush()
    return run_tests(mutant, log, timeout)


def run_mutant(mutant, logs, timeout, extension):
    """Applies, tests and restores one mutant; returns its result row (and prints it)."""
    path = ROOT / mutant.file
    original = path.read_text()
    start = time.time()
    with open(logs / f"{mutant.name}.log", "w") as log:
        if original.count(mutant.old) != 1:
            outcome = f"stale (text found {original.count(mutant.old)} times)"
        else:
            try:
                outcome = mutate_and_test(mutant, original, log, timeout, extension)
            finally:
                path.write_text(original)  # the same as `git checkout` of a clean file
    seconds = time.time() - start
    print(f"{outcome:>10}  {mutant.name}  ({mutant.file}, {seconds:.0f} s)", flush=True)
    return {"name": mutant.name, "file": mutant.file, "outcome": outcome,
            "seconds": round(seconds, 1)}


def report(results, chosen, json_path):
    """Prints the score and the mutants not killed; the exit status (0: every chosen mutant
    ran and was killed)."""
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"\nkilled {killed} of {len(results)}"
          + (f" ({100 * killed / len(results):.0f}%)" if results else ""))
    for r in results:
        if r["outcome"] != "killed":
            print(f"  NOT KILLED: {r['name']}: {r['outcome']}")
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results and killed == len(results) == len(chosen) else 1


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--logs", default=str(ROOT / "build" / "mutation-logs"),
                        help="one build+test log per mutant")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}")
    return args


def main():
    args = parse_arguments()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}: {m.why}\n    tests: {' '.join(m.tests)}  {m.env}")
        return 0
    check_imports(any(m.env is TRITON for m in chosen))
    signal.signal(signal.SIGTERM, _on_signal)
    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    results, extension = [], Extension()
    try:
        for m in chosen:
            results.append(run_mutant(m, logs, args.timeout, extension))
    except (KeyboardInterrupt, Interrupted) as error:
        print(f"stopped: {error}", file=sys.stderr)
    finally:
        with open(logs / "restore-build.log", "w") as log:
            if not extension.restore(log):
                print("the restored sources did not build: see restore-build.log",
                      file=sys.stderr)
    return report(results, chosen, args.json)


if __name__ == "__main__":
    sys.exit(main())
