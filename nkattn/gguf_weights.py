"""GGUF weights: write, read, dequantize, bound the rounding, and the seed's table pipeline.

Reads and writes with the `gguf` library (llama.cpp's ``gguf-py``: `GGUFWriter`,
`GGUFReader`, ``gguf.quants.quantize`` / ``dequantize``), imported lazily so that
nkattn imports without it. Four tensor types are supported, with the worst-case
per-element error of a round trip (x float32 -> type -> float32) derived from the
format:

* ``F32``: exact.
* ``F16``: round to nearest, 11 significant bits: ``|e| <= 2^-11 |x|`` for normal
  results, ``<= 2^-25`` (half the smallest subnormal) below 2^-14.
* ``BF16``: round to nearest even of the top 16 bits of the float32 pattern, 8
  significant bits: ``|e| <= 2^-8 |x|`` (same exponent range as float32; 2^-134,
  half the smallest bf16 subnormal, for float32 subnormals; zero stays zero).
* ``Q8_0``: blocks of 32 along a row, ``d = max|x| / 127`` per block,
  ``q = round(x / d)`` in int8 and d stored as float16 (d16). Then
  ``|x - q d16| <= |x - q d| + |q| |d - d16| <= d / 2 + 127 |d - d16|`` and
  ``|d - d16| <= max(2^-11 d, 2^-25)``: the block scale / 2 plus the rounding of
  the scale itself (``max|x| / 2048``); a slack of 2^-13 d covers the float32
  rounding of ``d``, of ``1 / d`` and of ``x * (1 / d)`` (|x / d| <= 127, a few ulps).

Tensor names follow llama.cpp's BERT conversion (``blk.{i}.attn_q.weight``, ...);
shapes are NumPy's row-major (out_features, in_features), GGUF's ``ne`` reversed.

The seed's pipeline (`weights_table`): GGUF -> dequantize -> rows -> Base17 int16
projection -> farthest-point L1 palette -> per-row palette index -> 256 x 256
``floor(L1 / 17)`` table, as in `nkattn.reference.table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("F32", "F16", "BF16", "Q8_0")
Q8_0_BLOCK = 32
ARCH = "bert"

# MiniLM (Hugging Face BertModel names) -> llama.cpp GGUF names
_HF_TO_GGUF = {
    "attention.self.query.weight": "attn_q.weight",
    "attention.self.key.weight": "attn_k.weight",
    "attention.self.value.weight": "attn_v.weight",
    "attention.output.dense.weight": "attn_output.weight",
}


class GGUFNotAvailable(ImportError):
    """The `gguf` package is not installed."""


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GGUFNotAvailable(f"{exc}; install it with `pip install gguf`") from exc
    return gguf


def _qtype(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return getattr(_gguf().GGMLQuantizationType, fmt)


def gguf_name(hf_name: str) -> str:
    """``encoder.layer.3.attention.self.key.weight`` -> ``blk.3.attn_k.weight``."""
    parts = hf_name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["encoder", "layer"] or parts[3] not in _HF_TO_GGUF:
        raise ValueError(f"not a MiniLM attention weight name: {hf_name!r}")
    return f"blk.{int(parts[2])}.{_HF_TO_GGUF[parts[3]]}"


def minilm_attention_weights(path: Path | None = None) -> dict[str, np.ndarray]:
    """The q/k/v/o dense weights of every layer of all-MiniLM-L6-v2 as float32, by GGUF name.

    Read from the `models` extra's ``model.safetensors`` (see `nkattn.reference.bert`).
    """
    from nkattn.reference import bert

    try:
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise bert.ModelNotAvailable(f"{exc}; {bert.INSTALL_HINT}") from exc
    path = bert.model_dir() if path is None else Path(path)
    weights = load_file(str(Path(path) / "model.safetensors"))
    out = {}
    for name in sorted(weights):
        try:
            key = gguf_name(name)
        except ValueError:
            continue
        out[key] = np.ascontiguousarray(weights[name], dtype=np.float32)
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split(".")[1]), kv[0])))


def write_gguf(path, tensors: dict[str, np.ndarray], fmt: str, *, arch: str = ARCH) -> Path:
    """Write float tensors to `path` in one format (F32, F16, BF16 or Q8_0)."""
    gguf = _gguf()
    qtype = _qtype(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name("nkattn-" + path.stem)
    for name, x in tensors.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"tensor {name!r} has non-finite values")
        if fmt == "Q8_0" and x.shape[-1] % Q8_0_BLOCK:
            raise ValueError(f"Q8_0 needs rows of a multiple of {Q8_0_BLOCK} elements; {name!r} has shape {x.shape}")
        if fmt in ("F32", "F16"):
            writer.add_tensor(name, x.astype(np.float16) if fmt == "F16" else x)
        else:
            packed = gguf.quants.quantize(x, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    format: str
    shape: tuple[int, ...]
    values: np.ndarray  # dequantized float32, NumPy shape
    raw: np.ndarray  # the stored blocks/elements as read


def read_gguf(path) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file, dequantized to float32 with ``gguf.quants.dequantize``."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        fmt = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        out[t.name] = GGUFTensor(t.name, fmt, shape, values, np.array(t.data))
    return out


def roundtrip_bound(x, fmt: str) -> np.ndarray:
    """Worst-case |dequantize(quantize(x)) - x| per element for float32 x (module docstring)."""
    _qtype(fmt)
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    if fmt == "F32":
        return np.zeros_like(x)
    if fmt == "F16":
        return np.maximum(2.0**-11 * np.abs(x), 2.0**-25)
    if fmt == "BF16":
        return np.maximum(2.0**-8 * np.abs(x), np.where(x != 0, 2.0**-134, 0.0))
    if x.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a last axis that is a multiple of {Q8_0_BLOCK}, got {x.shape}")
    blocks = x.reshape(*x.shape[:-1], -1, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    bound = d / 2.0 * (1.0 + 2.0**-12) + 127.0 * np.maximum(2.0**-11 * d, 2.0**-25)
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def roundtrip_check(original, restored, fmt: str) -> float:
    """max |restored - original| / bound over elements; raises AssertionError naming the worst element if > 1."""
    original = np.asarray(original, dtype=np.float32).astype(np.float64)
    restored = np.asarray(restored, dtype=np.float64)
    if original.shape != restored.shape:
        raise AssertionError(f"{fmt}: shape {restored.shape} != original {original.shape}")
    err = np.abs(restored - original)
    bound = roundtrip_bound(original, fmt)
    if fmt == "F32":
        if err.max(initial=0.0) > 0:
            worst = np.unravel_index(np.argmax(err), err.shape)
            raise AssertionError(f"F32 round trip is not exact at {worst}: {restored[worst]!r} vs {original[worst]!r}")
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
    worst = np.unravel_index(np.argmax(ratio), ratio.shape)
    if ratio[worst] > 1.0:
        raise AssertionError(
            f"{fmt}: error {err[worst]:.3e} at {tuple(int(i) for i in worst)} exceeds the format bound "
            f"{bound[worst]:.3e} ({restored[worst]!r} vs {original[worst]!r}); {(ratio > 1).mean():.2%} fail"
        )
    return float(ratio[worst])


def minilm_roundtrips(directory, formats=FORMATS, weights=None) -> list[dict]:
    """Write MiniLM's attention weights in each format, read back, check against the bounds.

    One record per (format, tensor): max abs error, max error / bound, file size.
    """
    weights = minilm_attention_weights() if weights is None else weights
    records = []
    for fmt in formats:
        path = write_gguf(Path(directory) / f"minilm-attn-{fmt.lower()}.gguf", weights, fmt)
        back = read_gguf(path)
        for name, x in weights.items():
            t = back[name]
            if t.format != fmt:
                raise AssertionError(f"{name}: stored as {t.format}, expected {fmt}")
            ratio = roundtrip_check(x, t.values, fmt)
            records.append(
                {
                    "format": fmt,
                    "tensor": name,
                    "shape": list(x.shape),
                    "max_abs_err": float(np.abs(t.values.astype(np.float64) - x).max()),
                    "max_err_over_bound": ratio,
                    "file_bytes": path.stat().st_size,
                }
            )
    return records


@dataclass(frozen=True)
class WeightTable:
    """The seed's compiled table for the rows of one weight matrix."""

    tensor: str
    format: str
    rows: np.ndarray  # (n, d) dequantized float32 rows
    codes_i16: np.ndarray  # (n, 17) Base17 int16
    palette_rows: np.ndarray  # (P,) row index of every palette entry
    assignment: np.ndarray  # (n,) uint8 palette index of every row
    table: np.ndarray  # (256, 256) uint16, floor(L1 / 17) (zero-padded past P)


def weights_table(path, tensor: str, *, palette_size: int = 256) -> WeightTable:
    """GGUF -> dequantize -> Base17 int16 -> farthest-point L1 palette -> assignment -> u16 table."""
    from nkattn.reference import table as T

    tensors = read_gguf(path)
    if tensor not in tensors:
        raise KeyError(f"tensor {tensor!r} not in {path}; it has {sorted(tensors)}")
    t = tensors[tensor]
    rows = t.values.reshape(-1, t.shape[-1])
    codes = T.base17_i16(rows)
    palette = T.farthest_point_palette(codes, palette_size)
    assignment = T.assign_l1(codes, codes[palette]).astype(np.uint8)
    table = T.pad_table(T.seed_distance_table(codes[palette]))
    return WeightTable(tensor, t.format, rows, codes, palette, assignment, table)
