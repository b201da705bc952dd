"""`nkattn` command line: info, run, bench, study, figures."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def _gpu_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def _choose_simulator() -> bool:
    """Use the CUDA simulator when there is no GPU, unless the user said otherwise.

    Must run before numba is imported: numba reads NUMBA_ENABLE_CUDASIM once.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_present():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def cmd_info(args) -> int:
    simulator = _choose_simulator()
    import nkattn
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
    print("backends:")
    for name, reasons in nkattn.backend_status().items():
        print(f"  {name:<10} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    print(f"methods: {', '.join(nkattn.api.METHODS)}")
    return 0


def cmd_run(args) -> int:
    simulator = _choose_simulator()
    from nkattn.runner import run_all

    return run_all(simulator=simulator, repeats=args.repeats)


def cmd_bench(args) -> int:
    _choose_simulator()
    if args.name == "exact":
        from nkattn.studies import exact_bench

        paths = exact_bench.run(quick=args.quick, repeats=args.repeats, seq_lens=args.seq_lens, long_sequence=args.long)
    elif args.name == "lsh":
        from nkattn.studies import lsh_bench

        paths = lsh_bench.run(quick=args.quick, seq_lens=args.seq_lens)
    else:
        from nkattn.studies import table_bench

        paths = table_bench.run(quick=args.quick, repeats=args.repeats)
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_study(args) -> int:
    import importlib

    from nkattn.studies import STUDIES

    if args.name not in STUDIES:
        print(f"unknown study {args.name!r}; available: {', '.join(sorted(STUDIES))}", file=sys.stderr)
        return 2
    module = importlib.import_module(STUDIES[args.name])
    kwargs = {"quick": args.quick}
    if args.results_dir is not None:
        kwargs["results_dir"] = Path(args.results_dir)
    for path in module.run(**kwargs):
        print(f"wrote {path}")
    return 0


def cmd_figures(args) -> int:
    from nkattn.figures import build_all

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nkattn", description="A Numba kernel lab for transformer attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device, simulator, backends").set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run every method on the built-in real-attention sample and print a table")
    p.add_argument("--repeats", type=int, default=None, help="runs per method for the determinism check (default 3, 2 in the simulator)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time kernels on the GPU beside torch SDPA and write results/bench/")
    p.add_argument("name", choices=["exact", "lsh", "table"])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeats", type=int, default=20, help="runs per timing (exact, table)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="override the sequence lengths (writes a -partial file)")
    p.add_argument("--long", action=argparse.BooleanOptionalAction, default=None, help="exact: also run N = 1M (default: with the full grid)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("study", help="run a study and write results/<study>/")
    p.add_argument("name")
    p.add_argument("--quick", action="store_true", help="a small configuration that finishes in under a minute")
    p.add_argument("--results-dir", default=None)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("figures", help="regenerate every figure from stored results only")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--figures-dir", default=None)
    p.set_defaults(func=cmd_figures)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    code = args.func(args)
    if args.command == "run":
        print(f"({time.perf_counter() - start:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
