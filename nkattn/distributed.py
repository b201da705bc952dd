"""Context-parallel exact attention over a torch.distributed process group, bit-identical to one device.

Every rank of a group of P holds a shard of the sequence of q, k and v (torch
tensors: CUDA with NCCL, CPU with gloo) and gets back its rows of O and lse,
bit for bit those of `nkattn.attention` on the whole sequence on one device
(the FFMA kernel for float32 and float64, d in 16..256, dv = d; the tensor-core kernel for
float16 and bfloat16, d and dv multiples of 8 up to 256). Two strategies:

* ``"heads"`` (DeepSpeed-Ulysses): an all-to-all gives each rank all N positions
  of H/P query heads and Hkv/P key/value heads, the unchanged one-device kernel
  runs on them, and an all-to-all brings the rows home. The kernel's rows do not
  depend on which other heads or rows share a launch (batch invariance), so the
  bits are those of one device. Needs H and Hkv divisible by P.
* ``"sequence"``: every key/value chunk is broadcast to every rank in key order
  (the next chunk's broadcast in flight while the current one is computed), and
  each rank folds the chunks its rows see into their running (m, l, acc) with the
  kernel's resume entry (`nkattn.cuda_kernels.exact.exact_attention_fold`, or
  `nkattn.cuda_kernels.exact_tc.tc_attention_fold` for the half kinds, wgmma only): the
  order of the tiles a row sees is the one-device kernel's, so are the bits. A ring
  would deliver chunks out of order, and a rank would have to hold them until their
  turn; a broadcast in key order needs ``kv_slots`` chunk buffers (below). Needs every
  chunk to be a whole number of the kernel's key tiles (`chunk_multiple`).

  ``kv_slots``: a broadcast completes only when every rank has posted it, and a rank
  posts chunk j's only once its folds of chunk j - S (the chunk that held the slot
  before) are done, so no rank runs more than S - 1 chunks ahead of the slowest.
  Without a mask every rank folds every chunk at the same cost and two slots suffice
  (the default). With zigzag, ranks see different chunks at different costs (rank
  P-1's two query chunks see the first chunks, rank 0's long chunk the last ones): two
  slots cap the efficiency at 0.8 on 4 GPUs in a model where a fold of a whole chunk
  costs 1 and a diagonal one 1/2, P slots remove the cap, so the causal default is
  max(2, P) slots, at most the 2P chunks. Measured on 4 H200s, float16, N = 1M: 0.72
  with two slots, 0.85 with four. Each slot holds a key and a value chunk (Nk / 2P
  positions with zigzag).

  ``query_passes``: each row carries a running state between folds (float32 accumulator
  and row sums on the tensor-core kernel: 1.06 GiB a GPU beside a 0.5 GiB float16 O at
  N = 4M, H = 4, d = 64 on 4 GPUs, which took "sequence" to 1.26x its shards and
  buffers). With R passes, a rank folds every key chunk into 1/R of its rows at a time,
  each pass broadcasting the chunks again: the state shrinks R-fold, the traffic grows
  R-fold (at 4M a call computes for ~15 s, a pass of broadcasts takes tens of ms). Rows
  see the same tiles in the same order, so the bits do not change. Default 1.

Shard layout (`shard`, `unshard`): the sequence (axis 2) of q and of k/v is cut
into P equal chunks, rank r holding chunk r; with ``zigzag`` (the default when
``causal``) into 2P chunks, rank r holding chunks r and 2P-1-r, in that order,
which gives every rank the same causal work. Both strategies take and return the
same layout, so they are interchangeable. key_lengths (B,) counts global keys and
is the same on every rank.

Errors: each rank checks its own inputs, then one all_gather of a small int64
descriptor compares what every rank passed; a bad input on any rank, or ranks
that disagree (shapes, dtype, strategy, masks, scale), raise ValueError or
TypeError on every rank, never a hang. A rank that never calls leaves the others
in that all_gather: create the group with a timeout (gloo raises when it expires;
NCCL's watchdog aborts)::

    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))

Launch one process per GPU, e.g. ``torchrun --nproc-per-node=4 train.py``, with
``torch.cuda.set_device(local_rank)`` before the first call.

Bit-identity holds for finite inputs (``check_finite=True`` refuses others): with
NaN or inf in v, rows that do not see the key may turn NaN or not depending on
which key tiles their launch visits (`nkattn.reference.exact`), and the
``"sequence"`` launches visit other tiles than the one-device launch.
"""

from __future__ import annotations

import zlib

import numpy as np

from nkattn import arrays

STRATEGIES = ("sequence", "heads")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *arrays.HALF_DTYPES)
# the backend each dtype runs on, as `nkattn.attention` labels it
KERNELS = {"cuda (FFMA kernel)": "ffma", "cuda (tensor-core kernel)": "tensor-core"}
# the descriptor every rank gathers: one int64 each, -1 where a field is unknown
FIELDS = ("error", "strategy", "causal", "zigzag", "dtype", "B", "H", "Hkv", "Nq / P", "Nk / P", "d", "dv",
          "key_lengths", "scale", "device", "query_passes")


def _chunks(world: int, zigzag: bool) -> int:
    return 2 * world if zigzag else world


def chunks_of(rank: int, world: int, zigzag: bool) -> tuple[int, ...]:
    """The chunks of the sequence that rank `rank` holds, in the order of its shard."""
    return (rank, 2 * world - 1 - rank) if zigzag else (rank,)


def shard(x, rank: int, world: int, *, zigzag: bool = False):
    """Rank `rank`'s shard of the full tensor x (B, H, N, d): chunk `rank` of P, or with
    `zigzag` chunks `rank` and 2P-1-`rank` of 2P, concatenated (a copy)."""
    import torch

    n, parts = x.shape[2], _chunks(world, zigzag)
    if n % parts:
        raise ValueError(f"a sequence of {n} does not split into {parts} equal chunks "
                         f"({world} ranks{', zigzag' if zigzag else ''})")
    size = n // parts
    return torch.cat([x[:, :, c * size : (c + 1) * size] for c in chunks_of(rank, world, zigzag)], dim=2)


def unshard(shards, *, zigzag: bool = False):
    """The full tensor from every rank's shard (a list in rank order), the inverse of `shard`;
    works for lse (B, H, N) too."""
    import torch

    world = len(shards)
    per_rank = [len(chunks_of(r, world, zigzag)) for r in range(world)]
    pieces = {c: part for r, s in enumerate(shards)
              for c, part in zip(chunks_of(r, world, zigzag), s.chunk(per_rank[r], dim=2), strict=True)}
    return torch.cat([pieces[c] for c in range(_chunks(world, zigzag))], dim=2)


def chunk_multiple(dtype, head_dim: int, value_dim: int | None = None) -> int:
    """The key tile BN of the kernel for this dtype, d and dv: ``"sequence"`` needs every key chunk
    (Nk / P, or Nk / 2P with zigzag) to be a multiple of it (float32/float64: 64 on a GPU, 8 in the
    simulator; float16/bfloat16: the tensor-core kernel's `default_config`, 128 up to d = 128 on
    Hopper, 16 in the simulator)."""
    dtype = np.dtype(dtype)
    if dtype in arrays.HALF_DTYPES:
        from nkattn.cuda_kernels.exact_tc import compute_capability, default_config

        return default_config(_kind(dtype), head_dim, value_dim or head_dim, compute_capability()).block_n
    from nkattn.cuda_kernels.online_softmax import kernel_order

    return kernel_order(dtype, head_dim).block_n


def attention(q, k, v, *, group=None, strategy: str = "sequence", causal: bool = False, zigzag: bool | None = None,
              key_lengths=None, scale: float | None = None, return_lse: bool = False, check_finite: bool = True,
              kv_slots: int | None = None, query_passes: int = 1):
    """Exact attention of this rank's rows; q, k and v are its shards (see the module docstring).

    q is (B, H, Nq/P, d), k (B, Hkv, Nk/P, d) and v (B, Hkv, Nk/P, dv) of one dtype (float32,
    float64, float16 or bfloat16) and device; ``zigzag`` (default: ``causal``) says how the
    shards were cut; ``kv_slots`` is the number of key/value chunk buffers of ``"sequence"`` and
    ``query_passes`` the number of passes over this rank's rows (defaults and trade-offs: the
    module docstring). The other arguments are `nkattn.attention`'s,
    with key_lengths counting global keys. Returns O (B, H, Nq/P, dv) in q's dtype, or (O, lse)
    with ``return_lse`` (lse in float32 for the half dtypes, as `nkattn.attention`), torch
    tensors on q's device.
    Every rank of `group` (default: the world) must call with the same options.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group(..., timeout=...) first")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        call = _local_call(q, k, v, world, strategy=strategy, causal=causal, zigzag=zigzag,
                           key_lengths=key_lengths, scale=scale, return_lse=return_lse, check_finite=check_finite,
                           kv_slots=kv_slots, query_passes=query_passes)
        local_error = None
    except (TypeError, ValueError) as exc:
        call, local_error = None, exc
    descriptor = _descriptor(call)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    gathered = [torch.empty(len(FIELDS), dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(descriptor, dtype=torch.int64, device=device), group=group)
    table = np.stack([g.cpu().numpy() for g in gathered])
    _check_agreement(table, rank, local_error)
    _check_shards(call, world)

    run = _sequence if call["strategy"] == "sequence" else _heads
    out, lse = run(call, rank, world, group)
    return (out, lse) if return_lse else out


def _local_call(q, k, v, world, *, strategy, causal, zigzag, key_lengths, scale, return_lse, check_finite,
                kv_slots=None, query_passes=1) -> dict:
    """This rank's inputs checked as `nkattn.attention` checks them, as a dict of what the run needs."""
    import torch

    from nkattn.api import plan
    from nkattn.methods import check_flag

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {arrays.describe_value(strategy)}")
    causal = check_flag("causal", causal)
    zigzag = causal if zigzag is None else check_flag("zigzag", zigzag)
    check_flag("return_lse", return_lse)
    if kv_slots is not None:
        if strategy != "sequence":
            raise ValueError(f'kv_slots is an option of strategy="sequence", got it with strategy={strategy!r}')
        if isinstance(kv_slots, bool) or not isinstance(kv_slots, (int, np.integer)) or kv_slots < 1:
            raise ValueError(f"kv_slots must be an int >= 1, got {arrays.describe_value(kv_slots)}")
    if isinstance(query_passes, bool) or not isinstance(query_passes, (int, np.integer)) or query_passes < 1:
        raise ValueError(f"query_passes must be an int >= 1, got {arrays.describe_value(query_passes)}")
    if query_passes != 1 and strategy != "sequence":
        raise ValueError(f'query_passes is an option of strategy="sequence", got it with strategy={strategy!r}')
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor (this rank's shard), got {arrays.describe_value(x)}")
    devices = {x.device for x in (q, k, v)}
    if len(devices) > 1:
        raise ValueError(f"q, k and v must be on one device, got {', '.join(str(x.device) for x in (q, k, v))}")
    dtype = arrays.dtype_of(q, "q")
    if dtype not in DTYPES:
        raise TypeError("context-parallel attention takes float32, float64 (FFMA kernel), float16 and bfloat16 "
                        f"(tensor-core kernel), got q of dtype {dtype}")
    # the local shards through nkattn.attention's checks (key_lengths count global keys: checked below);
    # CPU tensors as NumPy views, which plan() takes for host arrays
    views = [x if x.is_cuda else _host_view(x) for x in (q, k, v)]
    local, backend = plan(*views, causal=causal, scale=scale, backend="cuda", check_finite=check_finite)
    req = local.request
    if backend.label not in KERNELS:
        raise ValueError(f"context-parallel attention runs the FFMA or the tensor-core kernel, and {backend.label} "
                         "was chosen")
    if strategy == "sequence" and KERNELS[backend.label] == "tensor-core":
        from nkattn.cuda_kernels.exact_tc import compute_capability

        major, minor = compute_capability()
        if major != 9:
            raise ValueError('strategy="sequence" folds key chunks with the resume entry of the wgmma kernel '
                             f'(Hopper, compute capability 9.x), this GPU is {major}.{minor}: use strategy="heads"')
    lengths = None
    if key_lengths is not None:
        host = key_lengths.cpu().numpy() if isinstance(key_lengths, torch.Tensor) else key_lengths
        lengths = arrays.host_key_lengths(host, req.batch, req.nk * _chunks(world, zigzag))
    return {"q": q, "k": k, "v": v, "strategy": strategy, "causal": causal, "zigzag": zigzag, "dtype": dtype,
            "kernel": KERNELS[backend.label],
            "batch": req.batch, "heads": req.heads, "kv_heads": req.kv_heads, "nq": req.nq, "nk": req.nk,
            "head_dim": req.head_dim, "value_dim": req.value_dim, "key_lengths": lengths, "scale": local.scale,
            "kv_slots": kv_slots, "query_passes": int(query_passes)}


def _descriptor(call: dict | None) -> list[int]:
    if call is None:
        return [1] + [-1] * (len(FIELDS) - 1)
    lengths = call["key_lengths"]
    return [
        0, STRATEGIES.index(call["strategy"]), int(call["causal"]), int(call["zigzag"]), DTYPES.index(call["dtype"]),
        call["batch"], call["heads"], call["kv_heads"], call["nq"], call["nk"], call["head_dim"], call["value_dim"],
        -1 if lengths is None else zlib.crc32(lengths.astype(np.int64).tobytes()),
        int(np.float64(call["scale"]).view(np.int64)), int(call["q"].is_cuda), call["query_passes"],
    ]


def _check_agreement(table: np.ndarray, rank: int, local_error: Exception | None) -> None:
    """Raise on every rank if any rank refused its inputs or the ranks disagree."""
    failed = [r for r in range(table.shape[0]) if table[r, 0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"rank(s) {failed} of the group refused their inputs (their error says why); "
                         f"this rank ({rank}) stops too")
    differ = [name for i, name in enumerate(FIELDS) if len(set(table[:, i])) > 1]
    if differ:
        readable = {"strategy": lambda x: STRATEGIES[x], "dtype": lambda x: DTYPES[x].name,
                    "scale": lambda x: float(np.int64(x).view(np.float64)), "device": lambda x: ("cpu", "cuda")[x],
                    "key_lengths": lambda x: "none" if x == -1 else f"crc32 {x:#x}"}
        lines = [f"{name}: " + ", ".join(f"rank {r} {readable.get(name, int)(int(table[r, FIELDS.index(name)]))}"
                                         for r in range(table.shape[0])) for name in differ]
        raise ValueError("the ranks passed different inputs to nkattn.distributed.attention:\n  " + "\n  ".join(lines))


def _check_shards(call: dict, world: int) -> None:
    """What the strategy needs of the sizes; the same on every rank once they agree."""
    parts = len(chunks_of(0, world, call["zigzag"]))
    for name, n in (("q", call["nq"]), ("k and v", call["nk"])):
        if n % parts:
            raise ValueError(f"zigzag shards hold 2 chunks each: the shard of {name} has {n} positions, an odd number")
    if call["strategy"] == "heads":
        for name, h in (("H", call["heads"]), ("Hkv", call["kv_heads"])):
            if h % world:
                raise ValueError(f'strategy="heads" splits the heads over the {world} ranks: {name}={h} is not a multiple')
        return
    tile = chunk_multiple(call["dtype"], call["head_dim"], call["value_dim"])
    chunk = call["nk"] // parts
    if world * parts > 1 and chunk % tile:  # one rank with zigzag still folds 2 chunks
        raise ValueError(f'strategy="sequence" folds whole key tiles: a key chunk of {chunk} positions (Nk/{world * parts}) '
                         f"is not a multiple of the kernel's key tile {tile} ({call['dtype'].name}, d={call['head_dim']}, "
                         f"dv={call['value_dim']})")
    rows = call["nq"] // parts
    if call["query_passes"] > rows:
        raise ValueError(f"query_passes={call['query_passes']} passes over query chunks of {rows} rows would leave "
                         "passes with no row")


def _host_view(t):
    """A CPU tensor as NumPy (bfloat16, which torch cannot hand to NumPy, through its bits)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(arrays.BFLOAT16)
    return t.detach().numpy()


class _Device:
    """Kernel arrays for the inputs' device: numba views of CUDA tensors, launched on torch's
    current stream; copies of CPU tensors on the GPU (or the simulator) otherwise. Half tensors
    are seen as the tensor-core kernel reads them, their 16-bit patterns."""

    def __init__(self, tensor, dtype: np.dtype):
        import torch
        from numba import cuda

        self.torch_device = tensor.device
        self.on_gpu = tensor.is_cuda
        self.dtype = dtype
        self.stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream) if self.on_gpu else 0

    def view(self, t):
        from numba import cuda

        if self.on_gpu:
            return arrays.kernel_view(t, self.dtype)
        return cuda.to_device(arrays.kernel_host(_host_view(t), self.dtype), stream=self.stream)

    def empty(self, shape, dtype):
        """(torch tensor or None, kernel array) of `shape`: the tensor is what the caller gets back."""
        import torch
        from numba import cuda

        if self.on_gpu:
            t = torch.empty(shape, dtype=getattr(torch, dtype.name), device=self.torch_device)
            # a view, never kernel_view's aligned copy: the kernel's O, lse and state must land in t
            # (an lse of 21 float64 rows is 168 bytes a head, off kernel_view's 16-byte alignment)
            return t, arrays.bits_view(t, dtype)
        return None, cuda.device_array(shape, dtype=np.uint16 if dtype in arrays.HALF_DTYPES else dtype,
                                       stream=self.stream)

    def result(self, pair, dtype):
        import torch

        t, view = pair
        if self.on_gpu:
            return t
        host = view.copy_to_host(stream=self.stream)
        if dtype in arrays.HALF_DTYPES:
            return torch.from_numpy(host.view(np.int16)).view(getattr(torch, dtype.name))
        return torch.from_numpy(host)

    def lengths(self, call: dict, nk_total: int):
        from numba import cuda

        host = np.full(call["batch"], nk_total, np.int32) if call["key_lengths"] is None else call["key_lengths"]
        return cuda.to_device(host, stream=self.stream)


class _Fold:
    """One query chunk's output and carried state, and the kernel's resume entry that folds a key
    chunk into it: the FFMA kernel keeps the accumulator in O and the row sum in one array (the
    input's dtype); the tensor-core kernel keeps them in float32 (O and lse are in its dtypes:
    the input's and float32), the row sums by quad lane."""

    def __init__(self, dev: _Device, call: dict, rows: int):
        batch, heads, dtype, dv = call["batch"], call["heads"], call["dtype"], call["value_dim"]
        self.kernel, self.dev = call["kernel"], dev
        self.lse_dtype = _lse_dtype(call)
        self.out = dev.empty((batch, heads, rows, dv), dtype)
        self.lse = dev.empty((batch, heads, rows), self.lse_dtype)
        if self.kernel == "ffma":
            self.state = (dev.empty((batch, heads, rows), dtype)[1],)
        else:
            f32 = np.dtype(np.float32)
            self.state = (dev.empty((batch, heads, rows, dv), f32)[1], dev.empty((batch, heads, rows, 4), f32)[1])

    def __call__(self, q, k, v, lengths, **kw):
        if self.kernel == "ffma":
            from nkattn.cuda_kernels.exact import exact_attention_fold

            exact_attention_fold(q, k, v, lengths, self.out[1], self.lse[1], *self.state, **kw)
            return
        from nkattn.cuda_kernels.exact_tc import tc_attention_fold

        tc_attention_fold(q, k, v, lengths, self.out[1], self.lse[1], *self.state, kind=_kind(self.dev.dtype), **kw)

    def results(self, call: dict):
        return self.dev.result(self.out, call["dtype"]), self.dev.result(self.lse, self.lse_dtype)


def _kind(dtype: np.dtype) -> str:
    """The tensor-core kernel's kind of a half dtype."""
    return "f16" if dtype == np.float16 else "bf16"


def _lse_dtype(call: dict) -> np.dtype:
    """lse in the input's dtype on the FFMA kernel, float32 on the tensor-core kernel (as `nkattn.attention`)."""
    return call["dtype"] if call["kernel"] == "ffma" else np.dtype(np.float32)


def kv_slot_count(world: int, *, causal: bool, zigzag: bool | None = None, kv_slots: int | None = None) -> int:
    """The key/value chunk buffers ``"sequence"`` allocates: ``kv_slots``, or 2 (max(2, P) with a
    causal mask), at most one per chunk (module docstring)."""
    n_chunks = _chunks(world, causal if zigzag is None else zigzag)
    if kv_slots is not None:
        return min(int(kv_slots), n_chunks)
    return min(max(2, world) if causal else 2, n_chunks)


def _sequence(call: dict, rank: int, world: int, group):
    """Broadcast the key/value chunks in key order; fold each into the rows that see it."""
    import torch
    import torch.distributed as dist

    q, k, v = call["q"], call["k"], call["v"]
    zigzag, causal = call["zigzag"], call["causal"]
    n_chunks, mine = _chunks(world, zigzag), chunks_of(rank, world, zigzag)
    cq, ck = call["nq"] // len(mine), call["nk"] // len(mine)
    nq_total, nk_total = cq * n_chunks, ck * n_chunks
    dev = _Device(q, call["dtype"])
    lengths = dev.lengths(call, nk_total)

    # per pass, the key chunks each of this rank's query chunks' rows of that pass see, in key
    # order (at least one, which writes O = 0 and lse = -inf for rows that see no key); each
    # gets contiguous q, O, lse and state arrays: views into the shard's would be strided,
    # and the FFMA kernel specialised for strided arrays holds their strides in registers
    # (more spills, ptxas)
    batch = call["batch"]
    nk_b = np.full(batch, nk_total) if call["key_lengths"] is None else call["key_lengths"].astype(np.int64)
    passes = call["query_passes"]
    bounds = [cq * p // passes for p in range(passes + 1)]

    def folds_of_pass(p):
        folds = []
        for i, c in enumerate(mine):
            first_row, end_row = c * cq + bounds[p], c * cq + bounds[p + 1]
            # the last row sees the most keys (bottom-right causal, as the kernel)
            seen = int(np.minimum(nk_b, end_row + nk_b - nq_total).max()) if causal else int(nk_b.max())
            needed = [kc for kc in range(n_chunks) if kc * ck < seen] or [0]
            whole = len(mine) == 1 and passes == 1
            q_rows = q if whole else q[:, :, i * cq + bounds[p] : i * cq + bounds[p + 1]].contiguous()
            folds.append((first_row, needed, dev.view(q_rows), _Fold(dev, call, end_row - first_row)))
        return folds

    owners = {c: (r, j) for r in range(world) for j, c in enumerate(chunks_of(r, world, zigzag))}
    k_shape = (batch, call["kv_heads"], ck, call["head_dim"])
    v_shape = (batch, call["kv_heads"], ck, call["value_dim"])
    depth = kv_slot_count(world, causal=causal, zigzag=zigzag, kv_slots=call["kv_slots"])
    slots = [(torch.empty(k_shape, dtype=q.dtype, device=q.device), torch.empty(v_shape, dtype=q.dtype, device=q.device))
             for _ in range(depth)]

    def send(kc):
        owner, j = owners[kc]
        k_buf, v_buf = slots[kc % depth]
        if owner == rank:
            k_buf.copy_(k[:, :, j * ck : (j + 1) * ck])
            v_buf.copy_(v[:, :, j * ck : (j + 1) * ck])
        src = dist.get_global_rank(group, owner)
        return [dist.broadcast(buf, src=src, group=group, async_op=True) for buf in (k_buf, v_buf)]

    scale, stream = call["scale"], dev.stream
    parts = {}  # (query chunk, pass) -> (O, lse) of those rows
    for p in range(passes):
        folds = folds_of_pass(p)
        in_flight = {}
        for kc in range(n_chunks):
            # the chunks up to depth - 1 ahead travel while this one is computed; each slot's
            # previous chunk had its folds queued on this stream before the broadcast into it
            for ahead in range(kc + len(in_flight), min(kc + depth, n_chunks)):
                in_flight[ahead] = send(ahead)
            for work in in_flight.pop(kc):
                work.wait()
            k_chunk, v_chunk = (dev.view(buf) for buf in slots[kc % depth])
            for first_row, needed, q_view, fold in folds:
                if kc in needed:
                    fold(q_view, k_chunk, v_chunk, lengths, causal=causal, scale=scale, row_offset=first_row,
                         nq_total=nq_total, key_offset=kc * ck, first=kc == needed[0], last=kc == needed[-1],
                         stream=stream)
        # the pass's carried states go with its folds: only O and lse stay
        parts.update({(i, p): fold.results(call) for i, (*_, fold) in enumerate(folds)})
        del folds
    slots.clear()  # before the rows are joined, which holds a second O
    if len(parts) == 1:
        return parts[0, 0]
    order = [parts[i, p] for i in range(len(mine)) for p in range(passes)]
    return tuple(torch.cat([part[n] for part in order], dim=2) for n in (0, 1))


def _all_to_all(sent: list, group) -> list:
    """``received[r]`` is what rank r sent to this rank, for equal-shaped tensors: `all_to_all_single`
    over them stacked. gloo has no list ``all_to_all`` before torch 2.12 and exchanges host tensors
    only, so device tensors travel through the host there."""
    import torch
    import torch.distributed as dist

    stacked = torch.stack(sent)
    through_host = stacked.is_cuda and dist.get_backend(group) == "gloo"
    outgoing = stacked.cpu() if through_host else stacked
    incoming = torch.empty_like(outgoing)
    dist.all_to_all_single(incoming, outgoing, group=group)
    return list((incoming.to(stacked.device) if through_host else incoming).unbind(0))


def _heads(call: dict, rank: int, world: int, group):
    """All-to-all to whole sequences of H/P heads, the one-device kernel, all-to-all back."""
    import torch

    q, k, v = call["q"], call["k"], call["v"]
    zigzag, n_chunks = call["zigzag"], _chunks(world, call["zigzag"])

    def gather_sequence(x, heads):
        """(B, heads/P, N, ·): this rank's heads at every position, in global order."""
        per = heads // world
        got = _all_to_all([x[:, r * per : (r + 1) * per] for r in range(world)], group)
        pieces = {}
        for r, part in enumerate(got):
            mine = chunks_of(r, world, zigzag)
            pieces.update(zip(mine, part.chunk(len(mine), dim=2), strict=True))
        return torch.cat([pieces[c] for c in range(n_chunks)], dim=2)

    def scatter_rows(x):
        """The inverse: every rank's rows of this rank's heads home, heads back in order."""
        per_chunk = x.shape[2] // n_chunks
        sent = [torch.cat([x[:, :, c * per_chunk : (c + 1) * per_chunk] for c in chunks_of(r, world, zigzag)], dim=2)
                for r in range(world)]
        return torch.cat(_all_to_all(sent, group), dim=1)

    q_full, k_full, v_full = gather_sequence(q, call["heads"]), gather_sequence(k, call["kv_heads"]), gather_sequence(v, call["kv_heads"])
    dtype = call["dtype"]
    dev = _Device(q, dtype)
    nq_total, nk_total = q_full.shape[2], k_full.shape[2]
    heads = call["heads"] // world
    lse_dtype = _lse_dtype(call)
    out = dev.empty((call["batch"], heads, nq_total, call["value_dim"]), dtype)
    lse = dev.empty((call["batch"], heads, nq_total), lse_dtype)
    views = (dev.view(q_full), dev.view(k_full), dev.view(v_full), dev.lengths(call, nk_total))
    options = {"causal": call["causal"], "scale": call["scale"], "out": out[1], "lse": lse[1], "stream": dev.stream}
    if call["kernel"] == "ffma":
        from nkattn.cuda_kernels.exact import exact_attention

        exact_attention(*views, **options)
    else:
        from nkattn.cuda_kernels.exact_tc import tc_attention

        tc_attention(*views, kind=_kind(dtype), **options)
    return scatter_rows(dev.result(out, dtype)), scatter_rows(dev.result(lse, lse_dtype)[..., None])[..., 0]
