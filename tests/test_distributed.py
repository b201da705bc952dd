"""Context-parallel attention: 2 ranks, O and lse bit-identical to one device's, errors on every rank.

One session of 2 spawned gloo ranks (CPU tensors; the kernels run in the simulator,
or on the GPU where there is one) runs every case and the refusals while this
process computes the one-device results; the tests then read what the ranks wrote.
A second session of 2 ranks runs the timeout alone, so a peer left behind by it
cannot touch the bit checks. Sizes are whole key tiles of the kernel
(`chunk_multiple`: 8 in the simulator, 16 for float16's tensor-core kernel), the fewest a
strategy needs. The `gpu`
test repeats the cases on 2 GPUs over NCCL.

Each rank writes its stdout, stderr and, if it dies of a signal, faulthandler's
stacks to rank<r>.log; a session whose ranks fail fails with those logs' tails,
because a rank's own words are the only clue to a crash in gloo or the simulator.
"""

import datetime
import faulthandler
import os
import signal
import time

import numpy as np
import pytest
import torch

from nkattn import distributed
from nkattn.distributed import chunk_multiple, chunks_of, shard, unshard
from nkattn.results import RESULTS_DIR
from nkattn.testing import assert_bit_identical

from .conftest import REAL_GPU

WORLD = 2
TIMEOUT_S = 2.0
SESSION_LIMIT_S = 600  # a session still running then is hung: its ranks dump their stacks and are killed
BN = chunk_multiple(np.float32, 16)  # float32 and float64 tile alike at d = 16 in the simulator
assert BN == chunk_multiple(np.float64, 16) or REAL_GPU


def case(strategy, causal, dtype, h, hkv, chunks, masked=0, kv_slots=None, query_passes=1):
    """`chunks` key tiles of keys and of queries, cut into WORLD (or 2·WORLD, zigzag) shards;
    with `masked`, key_lengths hides the last `masked` keys."""
    n = chunks * chunk_multiple(dtype, 16)
    cid = (f"{strategy}-{'causal' if causal else 'full'}-H{h}-Hkv{hkv}-N{n}{f'-kl{n - masked}' if masked else ''}"
           f"-f{np.dtype(dtype).itemsize * 8}{f'-slots{kv_slots}' if kv_slots else ''}"
           f"{f'-passes{query_passes}' if query_passes > 1 else ''}")
    return {"id": cid, "strategy": strategy, "causal": causal, "dtype": dtype, "h": h, "hkv": hkv, "n": n, "masked": masked,
            "kv_slots": kv_slots, "query_passes": query_passes}


CASES = [
    case("sequence", False, np.float64, 2, 1, 2, masked=5, query_passes=3),  # GQA; the mask ends inside rank 1's chunk
    case("sequence", True, np.float32, 1, 1, 4, kv_slots=1, query_passes=2),  # zigzag: 4 chunks over 2 ranks, one buffer
    case("heads", False, np.float32, 2, 2, 2),
    case("heads", True, np.float64, 4, 2, 2, masked=3),  # GQA, zigzag shards, a mask
    # float16 on the tensor-core kernel (its resume entry for "sequence"): GQA, zigzag, a mask
    case("sequence", True, np.float16, 2, 1, 4, masked=7, kv_slots=4),  # every chunk in flight at once
    case("heads", False, np.float16, 2, 2, 2),
]


def inputs(c, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, c["h"], c["n"], 16)).astype(c["dtype"])
    k, v = (rng.standard_normal((1, c["hkv"], c["n"], 16)).astype(c["dtype"]) for _ in range(2))
    lengths = [c["n"] - c["masked"]] if c["masked"] else None
    return q, k, v, lengths


def one_device(c, seed):
    import nkattn

    q, k, v, lengths = inputs(c, seed)
    return nkattn.attention(q, k, v, causal=c["causal"], key_lengths=lengths, return_lse=True, backend="cuda")


def refusals(rank):
    """name -> (strategy, causal, q, k, v[, options]) this rank passes, the call each rank must refuse."""
    def t(h, n, dtype=torch.float64):
        return torch.ones(1, h, n, 16, dtype=dtype)

    return {
        "heads-not-divisible": ("heads", False, t(3, BN), t(3, BN), t(3, BN)),
        "kv-heads-not-divisible": ("heads", False, t(2, BN), t(1, BN), t(1, BN)),
        "chunk-not-whole-tiles": ("sequence", False, t(1, BN + 1), t(1, BN + 1), t(1, BN + 1)),
        "zigzag-odd-shard": ("sequence", True, t(1, 3), t(1, 3), t(1, 3)),
        "ranks-disagree-on-shapes": ("sequence", False, t(1, BN * (1 + rank)), t(1, BN), t(1, BN)),
        "ranks-disagree-on-strategy": (("sequence", "heads")[rank], False, t(2, BN), t(2, BN), t(2, BN)),
        # different pass counts would broadcast the chunks a different number of times: a hang
        "ranks-disagree-on-query-passes": ("sequence", False, t(1, BN), t(1, BN), t(1, BN), {"query_passes": 1 + rank}),
        "one-rank-bad-dtype": ("sequence", False, t(1, BN, (torch.float64, torch.float16)[rank]), t(1, BN), t(1, BN)),
    }


def start_rank(rank, backend, results, timeout_s):
    """Send this rank's output to results/rank<r>.log and join the group of WORLD ranks."""
    import torch.distributed as dist

    log = open(os.path.join(results, f"rank{rank}.log"), "w", buffering=1)  # noqa: SIM115 (open while the rank lives)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    # loopback, whatever the machine's hostname resolves to: every rank is on this host
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(results, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))
    return dist


def rank_main(rank, backend, results):
    """One rank: every case, then every refusal; writes what it saw to results/rank<r>.npy."""
    dist = start_rank(rank, backend, results, timeout_s=120)
    device = "cuda" if backend == "nccl" else "cpu"
    seen = {}
    for i, c in enumerate(CASES):
        q, k, v, lengths = (None if x is None else torch.as_tensor(x) for x in inputs(c, seed=i))
        zigzag = c["causal"]
        o, lse = distributed.attention(*(shard(x, rank, WORLD, zigzag=zigzag).to(device) for x in (q, k, v)),
                                       strategy=c["strategy"], causal=c["causal"], key_lengths=lengths, return_lse=True,
                                       kv_slots=c["kv_slots"], query_passes=c["query_passes"])
        seen[c["id"]] = (o.cpu().numpy(), lse.cpu().numpy())
    for name, (strategy, causal, q, k, v, *options) in refusals(rank).items():
        try:
            distributed.attention(q.to(device), k.to(device), v.to(device), strategy=strategy, causal=causal,
                                  **(options[0] if options else {}))
            seen[name] = None
        except (TypeError, ValueError) as exc:
            seen[name] = (type(exc).__name__, str(exc))
    dist.destroy_process_group()
    np.save(os.path.join(results, f"rank{rank}.npy"), seen, allow_pickle=True)


def silent_peer_main(rank, backend, results):
    """Rank 0 calls on a group whose other rank never calls, and must get an error once the
    group's timeout expires; rank 1 stays alive until then (a silent peer, not a closed one)."""
    dist = start_rank(rank, backend, results, timeout_s=120)
    # the short timeout only on the call's group: ranks start seconds apart under load
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    done = os.path.join(results, "rank0.done")
    seen = {}
    if rank == 0:
        start = time.perf_counter()
        try:
            distributed.attention(*(torch.ones(1, 1, BN, 16) for _ in range(3)), group=short)
            seen["timeout"] = None
        except RuntimeError as exc:
            seen["timeout"] = (time.perf_counter() - start, str(exc).splitlines()[0])
        open(done, "w").close()
    else:
        while not os.path.exists(done):
            time.sleep(0.05)
    dist.destroy_process_group()
    np.save(os.path.join(results, f"rank{rank}.npy"), seen, allow_pickle=True)


def spawn_ranks(main, backend, results, meanwhile=lambda: None):
    """Run `main` on WORLD spawned ranks, call `meanwhile` while they run, and return its
    result with what each rank saved; a failed rank fails the caller with the ranks' logs."""
    import torch.multiprocessing as mp

    context = mp.start_processes(main, args=(backend, str(results)), nprocs=WORLD, join=False, start_method="spawn")
    result = meanwhile()
    failure, deadline = None, time.monotonic() + SESSION_LIMIT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    os.kill(process.pid, signal.SIGUSR1)
                time.sleep(1)
                for process in context.processes:
                    process.kill()
                failure = f"still running after {SESSION_LIMIT_S} s"
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        failure = exc
    if failure is not None:
        logs = "\n".join(f"--- rank {r} log (last lines) ---\n{log_tail(results / f'rank{r}.log')}" for r in range(WORLD))
        pytest.fail(f"{main.__name__} on {backend}: {failure}\n{logs}", pytrace=False)
    return result, [np.load(results / f"rank{r}.npy", allow_pickle=True).item() for r in range(WORLD)]


def log_tail(path, lines=30):
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def run_ranks(backend, tmp_path):
    """The one-device results (computed while the ranks run) and what each rank saw."""
    return spawn_ranks(rank_main, backend, tmp_path,
                       meanwhile=lambda: {c["id"]: one_device(c, seed=i) for i, c in enumerate(CASES)})


@pytest.fixture(scope="module")
def gloo_session(tmp_path_factory):
    return run_ranks("gloo", tmp_path_factory.mktemp("gloo"))


def check_bits(c, expected, ranks):
    o_ref, lse_ref = expected[c["id"]]
    o = unshard([torch.from_numpy(r[c["id"]][0]) for r in ranks], zigzag=c["causal"]).numpy()
    lse = unshard([torch.from_numpy(r[c["id"]][1]) for r in ranks], zigzag=c["causal"]).numpy()
    assert_bit_identical("O", o, o_ref)
    assert_bit_identical("lse", lse, lse_ref)


@pytest.mark.parametrize("c", CASES, ids=[c["id"] for c in CASES])
def test_two_ranks_give_the_one_device_bits(gloo_session, c):
    check_bits(c, *gloo_session)


REFUSED = {
    "heads-not-divisible": ("ValueError", "H=3 is not a multiple"),
    "kv-heads-not-divisible": ("ValueError", "Hkv=1 is not a multiple"),
    "chunk-not-whole-tiles": ("ValueError", "is not a multiple of the kernel's key tile"),
    "zigzag-odd-shard": ("ValueError", "an odd number"),
    "ranks-disagree-on-shapes": ("ValueError", f"Nq / P: rank 0 {BN}, rank 1 {2 * BN}"),
    "ranks-disagree-on-strategy": ("ValueError", "strategy: rank 0 sequence, rank 1 heads"),
    "ranks-disagree-on-query-passes": ("ValueError", "query_passes: rank 0 1, rank 1 2"),
}


@pytest.mark.parametrize("name", [*REFUSED, "one-rank-bad-dtype"])
def test_bad_calls_raise_on_every_rank(gloo_session, name):
    _, ranks = gloo_session
    if name == "one-rank-bad-dtype":
        assert ranks[1][name][0] == "TypeError" and "float16" in ranks[1][name][1]
        assert ranks[0][name] == ("ValueError", ranks[0][name][1]) and "rank(s) [1]" in ranks[0][name][1]
        return
    kind, text = REFUSED[name]
    for r, seen in enumerate(ranks):
        assert seen[name] is not None, f"rank {r} accepted {name}"
        assert seen[name][0] == kind and text in seen[name][1], f"rank {r}: {seen[name]}"


def test_a_rank_that_never_calls_ends_in_the_groups_timeout(tmp_path):
    _, ranks = spawn_ranks(silent_peer_main, "gloo", tmp_path)
    assert ranks[0]["timeout"] is not None, "rank 0's call returned although rank 1 never called"
    waited, message = ranks[0]["timeout"]
    assert TIMEOUT_S * 0.9 <= waited <= TIMEOUT_S + 10, (waited, message)


def test_what_a_fold_writes_goes_through_a_view_not_an_aligned_copy():
    """`arrays.kernel_view` copies an input whose rows are off 16 bytes (cp.async needs them on 16), so a
    kernel writing through it would write the copy: the float64 lse of a query pass of 21 rows (168
    bytes a head) came back unwritten on the GPU. `arrays.bits_view`, which `_Device.empty` gives the
    folds, is the array itself."""
    from numba import cuda

    from nkattn import arrays

    lse = cuda.to_device(np.zeros((1, 2, 21)))
    f64 = np.dtype(np.float64)
    assert arrays.kernel_view(lse, f64) is not lse
    arrays.bits_view(lse, f64)[0, 1, 20] = 1.5
    assert lse.copy_to_host()[0, 1, 20] == 1.5


@pytest.mark.parametrize("zigzag", [False, True])
def test_shard_and_unshard_are_inverse(zigzag):
    x = torch.arange(2 * 3 * 16 * 2, dtype=torch.float64).reshape(2, 3, 16, 2)
    parts = [shard(x, r, 4, zigzag=zigzag) for r in range(4)]
    assert [p.shape[2] for p in parts] == [4] * 4
    assert torch.equal(unshard(parts, zigzag=zigzag), x)
    assert chunks_of(1, 4, zigzag) == ((1, 6) if zigzag else (1,))
    if zigzag:  # rank r holds chunks r and 2P-1-r of 2P
        assert torch.equal(parts[1], torch.cat([x[:, :, 2:4], x[:, :, 12:14]], dim=2))
    with pytest.raises(ValueError, match="does not split into 8 equal chunks"):
        shard(x[:, :, :12], 0, 4, zigzag=True)


def test_without_a_process_group_the_error_says_how_to_make_one():
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.attention(*(torch.ones(1, 1, BN, 16) for _ in range(3)))


def test_kv_slots_and_query_passes_are_checked_before_any_communication():
    shard_ = torch.ones(1, 1, BN, 16, dtype=torch.float64)
    for strategy, slots, match in (("sequence", 0, "kv_slots must be an int >= 1"), ("sequence", True, "kv_slots must be"),
                                   ("sequence", 2.0, "kv_slots must be"), ("heads", 2, 'option of strategy="sequence"')):
        with pytest.raises(ValueError, match=match):
            distributed._local_call(shard_, shard_, shard_, WORLD, strategy=strategy, causal=False, zigzag=None,
                                    key_lengths=None, scale=None, return_lse=False, check_finite=True, kv_slots=slots)
    for strategy, passes, match in (("sequence", 0, "query_passes must be an int >= 1"),
                                    ("heads", 2, 'query_passes is an option of strategy="sequence"')):
        with pytest.raises(ValueError, match=match):
            distributed._local_call(shard_, shard_, shard_, WORLD, strategy=strategy, causal=False, zigzag=None,
                                    key_lengths=None, scale=None, return_lse=False, check_finite=True,
                                    query_passes=passes)
    call = distributed._local_call(shard_, shard_, shard_, WORLD, strategy="sequence", causal=False, zigzag=None,
                                   key_lengths=None, scale=None, return_lse=False, check_finite=True,
                                   query_passes=BN + 1)
    with pytest.raises(ValueError, match="would leave passes with no row"):
        distributed._check_shards(call, WORLD)
    assert distributed.kv_slot_count(4, causal=True) == 4  # causal: one per rank
    assert distributed.kv_slot_count(4, causal=False) == 2
    assert distributed.kv_slot_count(1, causal=False) == 1  # at most one per chunk
    assert distributed.kv_slot_count(4, causal=True, kv_slots=99) == 8


def test_the_bench_passes_its_options_through_torchrun(monkeypatch, tmp_path):
    from nkattn.studies import distributed_bench as bench

    calls = []
    monkeypatch.setattr(bench, "run", lambda **kwargs: calls.append(kwargs))
    for options in ({"quick": True, "repeats": None, "seq_lens": None, "long_sequence": None, "dtype": "float32",
                     "memory_n": None},
                    {"quick": False, "repeats": 5, "seq_lens": [1024, 4096], "long_sequence": False, "dtype": "bfloat16",
                     "memory_n": 1 << 22}):
        cmd = bench.torchrun_command(gpus=2, results_dir=tmp_path, **options)
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        bench.main(cmd[cmd.index("nkattn.studies.distributed_bench") + 1 :])
        assert calls.pop() == {"results_dir": tmp_path, **options}
    assert [n for n, _, _ in bench.configs(quick=False, seq_lens=None, long_sequence=None)][-1] == bench.LONG_N
    assert bench.configs(quick=False, seq_lens=[512], long_sequence=None) == [(512, bench.HEADS, False), (512, bench.HEADS, True)]
    assert bench.scaling_efficiency(100.0, 4, 25.0) == 1.0
    assert bench.results_path(tmp_path, "NVIDIA H200", False, "float16").name == "distributed-h200-float16.json"
    assert bench.results_path(tmp_path, "NVIDIA H200", True).name == "distributed-h200-partial.json"
    assert bench.results_path(tmp_path, "NVIDIA H200", False, "float16", 8).name == "distributed-h200-x8-float16.json"
    assert bench.configs(quick=False, seq_lens=[], long_sequence=True, long_heads=8) == [(bench.LONG_N, 8, c) for c in (False, True)]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.run(dtype="float8")
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="memory_n must be a positive multiple of 2048"):
            bench.run(memory_n=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not REAL_GPU or torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs and a CUDA torch")
def test_two_gpus_over_nccl_give_the_one_gpu_bits(tmp_path):
    expected, ranks = run_ranks("nccl", tmp_path)
    for c in CASES:
        check_bits(c, expected, ranks)
    for name, (kind, text) in REFUSED.items():
        assert all(r[name][0] == kind and text in r[name][1] for r in ranks), name


# --------------------------------------------------------------------------------------
# the bench's figure (studies/distributed_bench_plots.py), from stored results only
# --------------------------------------------------------------------------------------

OLD_RUN, NEW_RUN = "2026-11-28T05:43:28+00:00", "2026-11-28T05:52:50+00:00"  # either side of b765ad5's code
REFUSAL = "RuntimeError: Load balancing requires `is_causal=True`."


def _bench_file(results_dir, name, date, records, *, quick=False):
    from nkattn.results import make_meta, write_results

    meta = make_meta(device="NVIDIA H200", command="nkattn bench distributed" + " --quick" * quick,
                     config={"dtype": records[0]["dtype"], "quick": quick})
    meta["date"] = date
    return write_results(results_dir / "bench" / name, meta, records)


def _bench_rows(n, h, causal, efficiency, *, gpus=(1, 2, 4), dtype="float16", bits=True):
    """One (N, causal) of the bench: the one-GPU row, then both strategies and torch's ring per P."""
    base = {"N": n, "H": h, "d": 64, "dtype": dtype, "causal": causal}
    rows = [{"impl": "nkattn-exact", "gpus": 1, "strategy": "one-gpu", **base, "median_ms": 100.0,
             "scaling_efficiency": 1.0, "bit_identical": True}]
    for p in gpus:
        rows += [{"impl": "nkattn-distributed", "gpus": p, "strategy": strategy, **base,
                  "median_ms": 100.0 / (p * efficiency), "scaling_efficiency": efficiency, "bit_identical": bits,
                  "peak_bytes": 1 << 30} for strategy in ("sequence", "heads")]
        ring = {"impl": "torch-context-parallel", "gpus": p, "strategy": "ring", **base}
        rows.append({**ring, "median_ms": 100.0 / (p * 1.5), "scaling_efficiency": 1.5} if causal
                    else {**ring, "skipped": REFUSAL})
    return rows


def _memory_rows(n=4096, h=4, p=4, over=0):
    """The bench's --memory-n records (float16, d = 64), peak = budget + `over` bytes."""
    one, lse = h * n // p * 64 * 2, h * n // p * 4
    rows = []
    for strategy, comm in (("sequence", 4 * one), ("heads", 6 * one)):
        budget = 4 * one + lse + comm
        rows.append({"impl": "nkattn-distributed", "gpus": p, "strategy": strategy, "N": n, "H": h, "d": 64,
                     "dtype": "float16", "causal": False, "ms": 1.0, "peak_bytes": budget + over,
                     "resident_bytes": 4 * one + lse, "comm_bytes": comm, "budget_bytes": budget,
                     "peak_over_budget": (budget + over) / budget})
    return rows, one + lse


@pytest.fixture
def drawn(monkeypatch):
    """The figures `distributed_bench_plots.save_figure` is given, kept for the test to read."""
    from nkattn.studies import distributed_bench_plots as plots

    figs, save = [], plots.save_figure

    def keep(fig, *args, **kwargs):
        paths = save(fig, *args, **kwargs)  # which adds the quick-run note
        figs.append((fig, fig._suptitle.get_text(), [t.get_text() for t in fig.texts]))
        return paths

    monkeypatch.setattr(plots, "save_figure", keep)
    return figs


def test_the_scaling_figure_is_drawn_from_stored_results_only(tmp_path, monkeypatch, drawn):
    from nkattn import figures
    from nkattn.studies import STUDIES
    from nkattn.studies import distributed_bench as bench
    from nkattn.studies import distributed_bench_plots as plots

    def forbidden(*args, **kwargs):
        raise AssertionError("a figure ran the bench")

    monkeypatch.setattr(bench, "run", forbidden)
    monkeypatch.setattr(bench, "_run_rank", forbidden)
    results = tmp_path / "results"
    memory, double_counted = _memory_rows(over=12345)
    _bench_file(results, "distributed-h200-float16.json", OLD_RUN,
                _bench_rows(65536, 8, False, 0.8) + _bench_rows(65536, 8, True, 0.7)
                + _bench_rows(262144, 8, False, 0.8) + _bench_rows(262144, 8, True, 0.7) + memory)
    _bench_file(results, "distributed-h200-float16-partial.json", NEW_RUN,
                _bench_rows(262144, 8, False, 0.9) + _bench_rows(262144, 8, True, 0.9))
    assert STUDIES["distributed-bench"].plots == plots.__name__
    paths = figures.build_all(results, tmp_path / "figures", studies=["distributed-bench"])
    assert paths == [tmp_path / "figures" / "bench" / f"distributed_scaling.{ext}" for ext in ("pdf", "png")]
    assert paths[0].read_bytes()[:5] == b"%PDF-" and paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = plots.fig_scaling(results, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]

    _, runs = plots._load(results)
    panels = plots._points(runs)
    eff = {(key, name): {p: r.get("scaling_efficiency") for p, r in pts.items()}
           for key, series in panels.items() for name, pts in series.items()}
    # the later run wins; the earlier run's causal "sequence" stays, as its own 2-slot line
    assert eff[("float16", 262144, 8, True), "sequence"] == {1: 0.9, 2: 0.9, 4: 0.9}
    assert eff[("float16", 262144, 8, True), "sequence-2"] == {1: 0.7, 2: 0.7, 4: 0.7}
    assert eff[("float16", 262144, 8, True), "heads"] == {1: 0.9, 2: 0.9, 4: 0.9}
    assert eff[("float16", 262144, 8, False), "sequence"] == {1: 0.9, 2: 0.9, 4: 0.9}
    assert ("float16", 65536, 8, True) in panels and "sequence" not in panels["float16", 65536, 8, True]
    assert ("float16", 262144, 8, False, "sequence-2") not in {(*k, n) for k, n in eff}
    assert all("skipped" in r for r in panels["float16", 65536, 8, False]["ring"].values())
    # the earlier run's memory records lose the O and lse shards it counted twice
    assert [(r["strategy"], r["peak_bytes"]) for r in plots._memory(runs)] == [
        (r["strategy"], r["peak_bytes"] - double_counted) for r in memory]
    _, title, _ = drawn[0]
    assert "every nkattn point bit-identical to one GPU" in title and "less the O and lse shards" in title


def test_the_scaling_figure_counts_the_points_that_are_not_bit_identical(tmp_path, drawn):
    from nkattn.studies import distributed_bench_plots as plots

    results = tmp_path / "results"
    _memory, _ = _memory_rows()
    passes = {**_memory[0], "query_passes": 4, "peak_bytes": _memory[0]["peak_bytes"] - 7}
    _bench_file(results, "distributed-h200-float16.json", NEW_RUN,
                _bench_rows(65536, 8, False, 0.9) + _bench_rows(65536, 8, True, 0.9, bits=False) + _memory + [passes])
    plots.fig_scaling(results, tmp_path / "figures")
    # the memory run's "sequence" with query passes is its own bar, not the latest "sequence"
    _, runs = plots._load(results)
    assert [(r["strategy"], r.get("query_passes", 1)) for r in plots._memory(runs)] == [
        ("sequence", 1), ("sequence", 4), ("heads", 1)]
    _, title, _ = drawn[0]
    assert "6 of 12 nkattn points bit-identical to one GPU (filled markers)" in title
    assert "less the O and lse shards" not in title  # a run of b765ad5's code counts them once


def test_the_scaling_figure_draws_a_quick_run_only_without_another_and_says_so(tmp_path, drawn):
    from nkattn.studies import distributed_bench_plots as plots

    results = tmp_path / "results"
    quick = _bench_rows(16384, 8, False, 0.9, gpus=(1,), dtype="float32") + _bench_rows(16384, 8, True, 0.9, gpus=(1,),
                                                                                        dtype="float32")
    _bench_file(results, "distributed-h100-partial.json", NEW_RUN, quick, quick=True)
    assert len(plots.fig_scaling(results, tmp_path / "quick")) == 2
    _, title, texts = drawn[-1]
    assert "on 1 × NVIDIA H200" in title and any(t.startswith("quick run (`nkattn bench distributed --quick`)")
                                                 for t in texts)
    _bench_file(results, "distributed-h200-float16.json", OLD_RUN, _bench_rows(65536, 8, True, 0.8))
    _, runs = plots._load(results)
    assert [r["path"].name for r in runs] == ["distributed-h200-float16.json"]
    plots.fig_scaling(results, tmp_path / "full")
    assert not any(t.startswith("quick run") for t in drawn[-1][2])


def test_the_scaling_figure_names_the_missing_result(tmp_path):
    from nkattn import figures
    from nkattn.studies import distributed_bench_plots as plots

    with pytest.raises(figures.MissingResultError) as info:
        plots.fig_scaling(tmp_path / "empty", tmp_path / "figures")
    message = str(info.value)
    assert str(tmp_path / "empty" / "bench" / "distributed-h200-float16.json") in message
    assert "`nkattn bench distributed --dtype float16 --memory-n 4194304 (on 4 GPUs)`" in message


STORED = ["distributed-h200-float16.json", "distributed-h200-float16-partial.json"]


@pytest.mark.skipif(not all((RESULTS_DIR / "bench" / f).exists() for f in STORED),
                    reason=f"the stored 4-GPU float16 runs ({', '.join(STORED)}) are not in results/bench")
def test_the_stored_runs_differ_by_what_b765ad5_changed_and_draw(tmp_path):
    """Where both float16 runs measured a grid row, the earlier peak is the later one plus the O and lse
    shards it counted twice, plus the K/V slots b765ad5's max(2, P) (at most one per chunk) removed or added:
    the correction the figure applies to the earlier run's memory records, checked on bytes."""
    from nkattn.results import read_results
    from nkattn.studies import distributed_bench_plots as plots

    old, new = (read_results(RESULTS_DIR / "bench" / f)["records"] for f in STORED)
    key = lambda r: (r["impl"], r["strategy"], r["gpus"], r["N"], r["H"], r["causal"])
    later = {key(r): r for r in new if "peak_bytes" in r}
    both = [(r, later[key(r)]) for r in old if key(r) in later and "budget_bytes" not in r]
    assert len(both) >= 20
    for before, after in both:
        p, causal, rows = before["gpus"], before["causal"], before["H"] * before["N"] // before["gpus"]
        shards = rows * before["d"] * 2 + rows * 4  # one float16 O shard and its float32 lse
        slots = 0
        if before["strategy"] == "sequence":
            chunks = 2 * p if causal else p
            kv_chunk = 2 * before["H"] * (before["N"] // chunks) * before["d"] * 2
            slots = (2 - distributed.kv_slot_count(p, causal=causal)) * kv_chunk
        assert before["peak_bytes"] - after["peak_bytes"] == shards + slots, key(before)
    assert len(plots.fig_scaling(RESULTS_DIR, tmp_path)) == 2
