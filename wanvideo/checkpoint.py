"""Reading safetensors checkpoints (single files and sharded sets) with errors a user can act on.

Headers are parsed here rather than trusted to the safetensors library so that an empty, truncated,
foreign or hostile file gets one clear CheckpointError naming the file, whatever its bytes are:
the header is checked against the format's rules (bounded size and nesting, typed entries, data
offsets that tile the data section exactly) before anything is allocated from it. Tensors are read
one at a time, checked for NaN/Inf, and handed to the placement module, which copies them into
fresh aligned storage: nothing keeps a view of the memory-mapped file (safetensors aligns tensors
to 8 bytes only).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import reprlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from .key_layouts import detect_layout, to_original

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.safetensors$")
MAX_HEADER = 100 * 1024 * 1024
MAX_NESTING = 64  # a real header nests 3 levels; json.loads recurses once per level
MAX_DIMS = 64
MAX_EXTENT = 2 ** 62  # bytes a shape may span with its zero sizes read as 1 (int64 strides)
_SHORT = 200
_SHOWN_MISSING = 5
_DEPTH_CHUNK = 1 << 20
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxlong = 3, 8, 6, 40
_REPR.maxstring = _REPR.maxother = _SHORT


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    key: str  # key as stored in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _short(value, limit: int = _SHORT) -> str:
    """repr bounded in length and cost: keys, entries and numbers come from the file and may be
    huge (reprlib looks at a few items of a list, never all of them)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensor table and the `__metadata__` strings.
    Raises CheckpointError (and nothing else) for any content of the file."""
    name = os.path.basename(path)
    raw, size = _header_bytes(path, name)
    header = _parse_json(raw, name)
    metadata = _metadata(header.pop("__metadata__", None), name)
    base = 8 + len(raw)
    tensors = {key: _entry(path, key, entry, base, size - base) for key, entry in header.items()}
    _check_coverage(name, tensors, base, size - base)
    return tensors, metadata


def _header_bytes(path: str, name: str) -> tuple[bytes, int]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{name}: not a .safetensors file (only safetensors checkpoints are read)")
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise CheckpointError(f"{name}: the file is empty (0 bytes); the download is probably incomplete")
        if size < 8:
            raise CheckpointError(f"{name}: truncated ({size} bytes); not a complete safetensors file")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER:
                raise CheckpointError(f"{name}: header claims {header_len} bytes, more than the "
                                      f"{MAX_HEADER} the format allows; not a safetensors file")
            if 8 + header_len > size:
                raise CheckpointError(f"{name}: header claims {header_len} bytes but the file has "
                                      f"{size}; the file is truncated or not safetensors")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{name}: truncated while reading its header")
    return raw, size


def _parse_json(raw: bytes, name: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{name}: safetensors header is not UTF-8 text (bad byte at "
                              f"{exc.start}); not a safetensors file") from None
    depth = _nesting_depth(raw)
    if depth > MAX_NESTING:
        raise CheckpointError(f"{name}: safetensors header nests deeper than {MAX_NESTING} levels "
                              f"(at least {depth}); the header is corrupt or hostile")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{name}: unreadable safetensors header "
                              f"({str(exc)[:_SHORT] or type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: safetensors header is a JSON {type(header).__name__}, "
                              "not an object")
    return header


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a repeated key would silently replace the first entry (and leave its
    bytes to no tensor), so it is refused by name instead."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_short(dup, 120)}")
    return out


def _nesting_depth(raw: bytes, chunk: int = _DEPTH_CHUNK, stop: int = MAX_NESTING) -> int:
    """Deepest [/{ nesting outside JSON strings, found without recursion (json.loads recurses once
    per level) in vectorized passes over chunks, so a hostile 100 MB header costs seconds, not a
    stack overflow. A quote ends a string unless an odd run of backslashes precedes it; that rule
    also applied outside strings only matters after a byte json rejects anyway. Returns early,
    with the depth seen so far, once deeper than `stop`."""
    deepest = level = run = quotes = 0
    for start in range(0, len(raw), chunk):
        x = torch.frombuffer(bytearray(raw[start:start + chunk]), dtype=torch.uint8)
        quote = x == 0x22
        backslash = x == 0x5C
        if run or bool(backslash.any()):
            idx = torch.arange(len(x))
            last_other = torch.where(backslash, -1 - run, idx).cummax(0).values
            before = torch.cat([torch.tensor([run]), idx[:-1] - last_other[:-1]])  # run length
            quote &= before % 2 == 0
            run = int(idx[-1] - last_other[-1])
        inside = (quote.cumsum(0) - quote.to(torch.int64) + quotes) % 2 == 1
        step = ((x == 0x5B) | (x == 0x7B)).to(torch.int64) - ((x == 0x5D) | (x == 0x7D)).to(torch.int64)
        depth = step.masked_fill_(inside, 0).cumsum(0) + level
        deepest, level = max(deepest, int(depth.max())), int(depth[-1])
        quotes += int(quote.sum())
        if deepest > stop:
            break
    return deepest


def _metadata(value, name: str) -> dict[str, str]:
    if value is None:  # the reference implementation reads `null` as "no metadata"
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{name}: '__metadata__' is a JSON {type(value).__name__}, not an "
                              "object of strings; the header is corrupt")
    for key, text in value.items():
        if not isinstance(text, str):
            raise CheckpointError(f"{name}: '__metadata__' entry {_short(key, 120)} is a JSON "
                                  f"{type(text).__name__} ({_short(text)}), not a string")
    return value


def _entry(path: str, key: str, entry, base: int, data_size: int) -> TensorInfo:
    """One tensor's header entry, checked against the format and the size of the data section."""
    where = f"{os.path.basename(path)}: tensor {_short(key, 120)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: malformed header entry {_short(entry)} (expected an "
                              "object with dtype, shape and data_offsets)")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: dtype {_short(dtype, 60)} is not one this loader reads "
                              f"({', '.join(SAFETENSORS_DTYPES)})")
    shape = _int_list(entry["shape"], where, "shape", MAX_DIMS)
    dt = SAFETENSORS_DTYPES[dtype]
    if math.prod(max(s, 1) for s in shape) * dt.itemsize >= MAX_EXTENT:  # zero sizes included
        raise CheckpointError(f"{where}: shape {_short(shape)} is larger than any tensor "
                              "(torch computes its strides in int64)")
    begin, end = _int_list(entry["data_offsets"], where, "data_offsets", 2, exact=True)
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets [{_short(begin, 40)}, {_short(end, 40)}] "
                              "end before they begin")
    if end > data_size:
        raise CheckpointError(f"{where}: truncated: the tensor needs bytes up to "
                              f"{_short(base + end, 40)} but the file has {base + data_size}")
    expected = dt.itemsize * math.prod(shape)
    if end - begin != expected:
        raise CheckpointError(f"{where}: holds {end - begin} bytes, expected {_short(expected, 40)} "
                              f"for shape {_short(shape)} {dtype}")
    return TensorInfo(path, key, dt, tuple(shape), base + begin, end - begin)


def _int_list(value, where: str, what: str, most: int, exact: bool = False) -> list[int]:
    """A JSON list of non-negative ints (bools are not ints), at most `most` long (exactly, with
    `exact`); the length is checked before the items so a huge list costs nothing."""
    if not isinstance(value, list) or len(value) > most or (exact and len(value) != most) or \
            not all(type(v) is int and v >= 0 for v in value):
        count = f"{most}" if exact else f"at most {most}"
        raise CheckpointError(f"{where}: {what} {_short(value)} must be a list of {count} "
                              "non-negative integers")
    return value


def _check_coverage(name: str, tensors: Mapping[str, TensorInfo], base: int, data_size: int) -> None:
    """The tensors, sorted by offset, must tile the data section: no overlap, no gap, no tail."""
    spans = sorted((info.start - base, info.nbytes, key) for key, info in tensors.items())
    cursor, previous = 0, None
    for begin, nbytes, key in spans:
        if begin < cursor:
            raise CheckpointError(f"{name}: tensors {_short(previous, 120)} and {_short(key, 120)} "
                                  f"overlap (data bytes {begin}..{cursor}); the header is corrupt")
        if begin > cursor:
            raise CheckpointError(f"{name}: data bytes {cursor}..{begin} before tensor "
                                  f"{_short(key, 120)} belong to no tensor; the header is corrupt")
        cursor, previous = begin + nbytes, key
    if cursor != data_size:
        raise CheckpointError(f"{name}: the tensors cover {cursor} of the {data_size} data bytes; "
                              "the rest belongs to no tensor (corrupt header or appended data)")


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """A file, a folder of shards, one shard of a `-0000K-of-0000N` set, or an explicit list."""
    if isinstance(paths, (list, tuple)):
        out = []
        for p in paths:
            out.extend(expand_paths(p))
        return sorted(set(out))
    path = os.fspath(paths)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors files")
        return files
    m = _SHARD.match(path)
    return _shard_set(path, m.group(1), int(m.group(2)), int(m.group(3))) if m else [path]


def _shard_set(path: str, stem: str, index: int, count: int) -> list[str]:
    name = os.path.basename(path)
    if count == 0 or not 1 <= index <= count:
        raise CheckpointError(f"{name}: not a valid shard name (shard {index} of {count}; shards "
                              "are numbered 00001 to N of N >= 1)")
    files = [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    try:  # one listing instead of up to 99,999 stat calls
        present = set(os.listdir(os.path.dirname(path) or "."))
    except OSError:
        present = set()
    missing = [os.path.basename(f) for f in files
               if os.path.basename(f) not in present or not os.path.isfile(f)]
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        raise CheckpointError(f"{name}: sharded set of {count} files is incomplete: "
                              f"{len(missing)} missing ({shown})")
    return files


# Floating dtypes torch cannot reduce on the CPU, checked through integer views instead: the
# largest signed byte and the largest unsigned byte that are still finite. e4m3fn has no Inf and
# one NaN per sign (0x7F, 0xFF); e5m2 is Inf/NaN from exponent 11111 (0x7C-0x7F, 0xFC-0xFF).
_FP8_FINITE_MAX = {torch.float8_e4m3fn: (0x7E, 0xFE), torch.float8_e5m2: (0x7B, 0xFB)}
_FP8_EXP_MASK = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN/Inf. One reduction pass without temporaries (aminmax
    propagates NaN and exposes +-Inf), ~50x faster on the CPU than isfinite(t).all(); see
    bench/load_check.py. Integer and bool tensors are always finite."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    flat = t.reshape(-1)
    if flat.dtype in _FP8_FINITE_MAX:
        signed, unsigned = _FP8_FINITE_MAX[flat.dtype]
        return int(flat.view(torch.int8).amax()) <= signed and \
            int(flat.view(torch.uint8).amax()) <= unsigned
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds (slow path, only for the error message)."""
    if not t.dtype.is_floating_point:
        return 0
    flat = t.reshape(-1)
    if flat.dtype in _FP8_EXP_MASK:
        mask = _FP8_EXP_MASK[flat.dtype]
        return int(((flat.view(torch.uint8) & mask) == mask).sum())
    return int((~torch.isfinite(flat)).sum())


def check_finite(t: torch.Tensor, where: str, key: str) -> None:
    """CheckpointError naming `where` and `key` when `t` holds NaN/Inf."""
    if not all_finite(t):
        raise CheckpointError(f"{where}: tensor {_short(key, 120)} holds NaN/Inf values "
                              f"({count_nonfinite(t):,} of {t.numel():,}); the file is corrupt "
                              "(download it again, or re-export it from a model with finite weights)")


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read into its own host allocation (never a view of a mapping), unchecked."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        name = os.path.basename(info.file)
        try:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            raise CheckpointError(f"{name}: cannot be read ({exc.strerror or exc})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{name}: truncated while reading {_short(info.key, 120)}")
    return out


@dataclass
class Checkpoint:
    """All tensors of one checkpoint (possibly several files), keyed in the original layout."""
    files: list[str]
    layout: str
    tensors: dict[str, TensorInfo]  # original-layout key -> where it lives
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.files[0]) + (f" (+{len(self.files) - 1} shards)" if len(self.files) > 1 else "")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    def stored_dtype(self, prefix: str = "blocks.") -> str:
        """Dtype of most weight matrices, e.g. 'bfloat16' or 'float8_e4m3fn'."""
        counts = Counter(str(v.dtype).replace("torch.", "") for k, v in self.tensors.items()
                         if k.startswith(prefix) and len(v.shape) >= 2)
        return counts.most_common(1)[0][0] if counts else "unknown"

    def read(self, key: str) -> torch.Tensor:
        """One tensor in its own host allocation; CheckpointError when it holds NaN/Inf."""
        info = self.tensors[key]
        out = read_tensor(info)
        check_finite(out, os.path.basename(info.file), info.key)
        return out

    def lazy(self, keys=None) -> "LazyTensors":
        return LazyTensors(self, keys)


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-on-access view so a 30 GB checkpoint never sits in host RAM twice."""

    def __init__(self, ckpt: Checkpoint, keys=None):
        self.ckpt = ckpt
        self.keys_ = list(ckpt.tensors) if keys is None else [k for k in keys if k in ckpt.tensors]
        self.key_set = set(self.keys_)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.key_set:
            raise KeyError(key)
        return self.ckpt.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key) -> bool:
        return key in self.key_set


def load_tensors(path: str, where: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, keys as stored (no layout mapping), each read
    through the strict header parser into its own allocation and checked for NaN/Inf. For small
    side files (LoRAs, wav2vec2 weights, text embeds); errors are CheckpointError naming the
    file, prefixed with `where` when given (e.g. "wav2vec2 model")."""
    try:
        tensors, metadata = read_header(path)
        ckpt = Checkpoint([path], "stored", tensors, metadata)
        return {key: ckpt.read(key) for key in tensors}
    except CheckpointError as exc:
        if where and not str(exc).startswith(where):
            raise CheckpointError(f"{where}: {exc}") from None
        raise


def open_checkpoint(paths: str | Sequence[str]) -> Checkpoint:
    files = expand_paths(paths)
    raw: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for path in files:
        tensors, meta = read_header(path)
        raw.update(tensors)
        metadata.update(meta)
    if not raw:
        raise CheckpointError(f"{os.path.basename(files[0])}: the file holds no tensors")
    layout = detect_layout(raw)
    tensors = {to_original(k, layout): v for k, v in raw.items()}
    return Checkpoint(files, layout, tensors, metadata)
