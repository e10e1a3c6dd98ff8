"""The safetensors reader against hostile and broken files: every rule of the format gives one
CheckpointError naming the file (and the tensor), never another exception, a recursion, a huge
allocation or a huge message; NaN/Inf weights are refused; shard names are checked."""
import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from wanvideo_infinitetalk.wanvideo import checkpoint as ck
from wanvideo_infinitetalk.wanvideo.checkpoint import CheckpointError, load_tensors
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors

NAME = "model.safetensors"
MAX_MESSAGE = 700


def write_raw(folder, header, data=b"", name=NAME, header_len=None) -> str:
    """8-byte little-endian header length + header (a dict, or raw bytes) + data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def f32(begin, n=2, key_shape=None):
    return {"dtype": "F32", "shape": key_shape or [n], "data_offsets": [begin, begin + 4 * n]}


def refused(path, *needles) -> str:
    with pytest.raises(CheckpointError) as info:
        load_tensors(path)
    assert type(info.value) is CheckpointError
    message = str(info.value)
    assert os.path.basename(path) in message and len(message) < MAX_MESSAGE, message
    for needle in needles:
        assert needle in message, message
    return message


def test_valid_file_and_unsorted_entries_load(tmp_path):
    data = struct.pack("<4f", 1, 2, 3, 4)
    header = {"__metadata__": {"format": "pt"}, "b": f32(8), "a": f32(0)}  # b first in the JSON
    path = write_raw(tmp_path, header, data)
    tensors = load_tensors(path)
    assert tensors["a"].tolist() == [1, 2] and tensors["b"].tolist() == [3, 4]
    assert ck.read_header(path)[1] == {"format": "pt"}


def test_zero_size_tensors_and_null_metadata_load(tmp_path):
    header = {"__metadata__": None, "e": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [8, 8]},
              "a": f32(0), "s": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}}
    tensors = load_tensors(write_raw(tmp_path, header, bytes(12)))
    assert tensors["e"].shape == (0, 5) and tensors["s"].shape == ()


def test_brackets_and_escapes_inside_strings_are_not_nesting(tmp_path):
    key = 'odd \\" key ' + "[{" * 5000
    header = {key: f32(0), "__metadata__": {"prompt": json.dumps({"p": ["[" * 300, '"\\']})}}
    assert set(load_tensors(write_raw(tmp_path, header, bytes(8)))) == {key}


@pytest.mark.parametrize("offsets, needle", [
    ([-4, 4], "non-negative"), ([0.0, 8.0], "non-negative integers"), (["0", "8"], "integers"),
    ([0, 8, 16], "list of 2"), ([0], "list of 2"), ([False, 8], "integers"), (None, "integers"),
    ([8, 0], "end before they begin"), ([0, 2 ** 70], "truncated"), ([0, 10 ** 30], "truncated"),
])
def test_bad_data_offsets(tmp_path, offsets, needle):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}
    refused(write_raw(tmp_path, header, bytes(8)), "'w'", needle)


@pytest.mark.parametrize("shape, needle", [
    ([-1, 2], "non-negative"), ([True, 2], "integers"), ([2.0], "integers"), ("2", "integers"),
    ([1e30], "integers"), ([10 ** 30], "larger than any tensor"), ([2 ** 70, 0], "larger than"),
    ([2 ** 30, 2 ** 30, 0], "larger than"), ([0] + [2 ** 62 - 1] * 63, "larger than"),
    ([2 ** 20, 2 ** 20], "expected 4398046511104"), ([1] * 65, "at most 64"),
    ([3], "holds 8 bytes, expected 12"),
])
def test_bad_shapes(tmp_path, shape, needle):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    refused(write_raw(tmp_path, header, bytes(8)), "'w'", needle)


def test_overlapping_tensors(tmp_path):
    refused(write_raw(tmp_path, {"a": f32(0), "b": f32(4)}, bytes(12)), "overlap", "'a'", "'b'")


def test_gap_between_tensors(tmp_path):
    refused(write_raw(tmp_path, {"a": f32(0), "b": f32(12)}, bytes(20)),
            "data bytes 8..12 before tensor 'b' belong to no tensor")


def test_first_tensor_must_start_at_zero(tmp_path):
    refused(write_raw(tmp_path, {"a": f32(4)}, bytes(12)), "data bytes 0..4")


def test_tensors_must_cover_the_data_section(tmp_path):
    refused(write_raw(tmp_path, {"a": f32(0)}, bytes(12)), "cover 8 of the 12 data bytes")
    refused(write_raw(tmp_path, {}, bytes(4)), "cover 0 of the 4")


def test_tensor_beyond_the_end_is_truncation(tmp_path):
    refused(write_raw(tmp_path, {"a": f32(0, 4)}, bytes(8)), "'a'", "truncated")


@pytest.mark.parametrize("header, needle", [
    (b"[" * 100_000, "nests deeper than 64 levels (at least 100000)"),
    (b'{"__metadata__": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nests"),
    (b'{"a": ' + b'{"b": ' * 70_000, "nests"),
    (b"[]", "JSON list, not an object"), (b"7", "not an object"), (b"", "unreadable"),
    (b'{"a": 1', "unreadable"), (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": ' + b"9" * 5000 + b"}", "unreadable"),
    (json.dumps({"a": f32(0), "b": f32(8)}).replace('"b"', '"a"').encode(), "duplicate key 'a'"),
])
def test_unparseable_headers(tmp_path, header, needle):
    refused(write_raw(tmp_path, header, bytes(16)), needle)


def test_nesting_up_to_the_limit_is_parsed(tmp_path):
    deep = b"[" * (ck.MAX_NESTING - 2) + b"]" * (ck.MAX_NESTING - 2)
    path = write_raw(tmp_path, b'{"__metadata__": {"x": ' + deep + b"}}")
    refused(path, "'__metadata__' entry 'x' is a JSON list")  # parsed; then refused by type


@pytest.mark.parametrize("metadata, needle", [
    ([1], "'__metadata__' is a JSON list"), ("text", "is a JSON str"),
    ({"k": 1}, "entry 'k' is a JSON int"), ({"k": None}, "NoneType"), ({"k": {"a": "b"}}, "dict"),
])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata, needle):
    refused(write_raw(tmp_path, {"__metadata__": metadata, "a": f32(0)}, bytes(8)), needle)


@pytest.mark.parametrize("entry, needle", [
    (5, "malformed header entry 5"), ({"dtype": "F32", "shape": [2]}, "malformed"),
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 8]}, "dtype 'F4' is not one"),
    ({"dtype": 4, "shape": [2], "data_offsets": [0, 8]}, "dtype 4"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype ['F32']"),
])
def test_bad_entries(tmp_path, entry, needle):
    refused(write_raw(tmp_path, {"w": entry}, bytes(8)), "'w'", needle)


def test_header_length_beyond_the_file(tmp_path):
    refused(write_raw(tmp_path, b"{}", header_len=10 ** 6), "header claims 1000000 bytes")
    refused(write_raw(tmp_path, b"{}", header_len=2 ** 64 - 1), "more than the")
    refused(write_raw(tmp_path, b"{}", header_len=ck.MAX_HEADER + 1), "more than the")


def test_messages_stay_short_for_huge_keys_and_entries(tmp_path):
    key = "k" * 100_000
    refused(write_raw(tmp_path, {key: {"dtype": "X" * 50_000, "shape": [1] * 10_000,
                                       "data_offsets": [0, 8]}}, bytes(8)), "kkk")
    refused(write_raw(tmp_path, {"w": [0] * 100_000}, bytes(8)), "malformed")


FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn,
          torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "negative nan"])
def test_nonfinite_weights_are_refused(tmp_path, dtype, bad):
    good = torch.linspace(-1, 1, 1000).to(dtype)
    t = good.clone()
    bits = t.view(torch.uint8 if dtype.itemsize == 1 else getattr(torch, f"int{dtype.itemsize * 8}"))
    if bad == "negative nan":  # every bit set: NaN with the sign bit, in every float format
        bits[[3, 777]] = -1 if bits.dtype != torch.uint8 else 255
    elif dtype == torch.float8_e4m3fn and bad != "nan":  # no Inf in e4m3fn: its NaN instead
        bits[[3, 777]] = 0x7F if bad == "inf" else 0xFF
    else:
        t[[3, 777]] = float(bad)
    path = os.path.join(tmp_path, NAME)
    write_safetensors(path, {"blocks.0.ok": good, "blocks.3.ffn.0.weight": t, "later": t})
    refused(path, "tensor 'blocks.3.ffn.0.weight' holds NaN/Inf values (2 of 1,000)", "corrupt")
    ckpt = ck.Checkpoint([path], "original", ck.read_header(path)[0])
    assert torch.equal(ckpt.read("blocks.0.ok").view(torch.uint8), good.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_load_model_refuses_a_nan_weight(tmp_path, dtype):
    from wanvideo_infinitetalk.wanvideo.loader import load_model
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict, write_checkpoint

    sd = random_state_dict(TINY_I2V, seed=0)
    sd["blocks.1.ffn.0.weight"][3, 5] = float("nan")
    path = write_checkpoint(sd, os.path.join(tmp_path, "wan_nan.safetensors"), "comfy", dtype)[0]
    with pytest.raises(CheckpointError, match=r"wan_nan\.safetensors: tensor "
                       r"'model\.diffusion_model\.blocks\.1\.ffn\.0\.weight' holds NaN/Inf values \(1 of"):
        load_model(path, base_dtype="fp32")


def test_integer_tensors_are_not_checked_and_every_finite_pattern_passes(tmp_path):
    everything = torch.arange(256, dtype=torch.uint8)
    e4m3 = everything[(everything & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    e5m2 = everything[(everything & 0x7C) != 0x7C].view(torch.float8_e5m2)
    ints = torch.tensor([-1, 0x7F800000, 0x7FC00000], dtype=torch.int32)
    path = os.path.join(tmp_path, NAME)
    write_safetensors(path, {"e4m3": e4m3, "e5m2": e5m2, "i": ints, "u8": everything,
                             "big": torch.tensor([torch.finfo(torch.bfloat16).max]).bfloat16()})
    assert set(load_tensors(path)) == {"e4m3", "e5m2", "i", "u8", "big"}


def test_where_prefixes_the_message(tmp_path):
    path = write_raw(tmp_path, {"a": f32(4)}, bytes(12))
    with pytest.raises(CheckpointError, match=rf"^wav2vec2 model: {NAME}: data bytes 0..4"):
        load_tensors(path, where="wav2vec2 model")


@pytest.mark.parametrize("shard, needle", [
    ("m-00001-of-00000.safetensors", "shard 1 of 0"), ("m-00000-of-00002.safetensors", "shard 0 of 2"),
    ("m-00003-of-00002.safetensors", "shard 3 of 2"),
    ("m-00001-of-99999.safetensors", "set of 99999 files is incomplete: 99998 missing "
     "(m-00002-of-99999.safetensors, m-00003-of-99999.safetensors, "),
])
def test_bad_shard_sets_give_one_short_message(tmp_path, shard, needle):
    path = write_raw(tmp_path, {"a": f32(0)}, bytes(8), name=shard)
    with pytest.raises(CheckpointError) as info:
        ck.open_checkpoint(path)
    message = str(info.value)
    assert message.startswith(shard) and needle in message and len(message) < 400, message


# ----------------------------------------------------------------------------- fuzzing

def sequential_depth(raw: bytes) -> int:
    """The rule _nesting_depth vectorizes, one byte at a time: a quote preceded by an odd run of
    backslashes does not open or close a string; brackets outside strings count."""
    depth = deepest = 0
    inside = odd = False
    for c in raw:
        if c == ord('"') and not odd:
            inside = not inside
        elif not inside and c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not inside and c in b"]}":
            depth -= 1
        odd = c == ord("\\") and not odd
    return deepest


@settings(max_examples=400, deadline=2000)
@given(raw=st.lists(st.sampled_from(list(b'[]{}"\\ a')), max_size=60).map(bytes),
       chunk=st.integers(1, 9))
def test_nesting_depth_matches_the_sequential_rule_across_chunks(raw, chunk):
    assert ck._nesting_depth(raw, chunk=chunk, stop=10 ** 9) == sequential_depth(raw)


VALID = {"__metadata__": {"format": "pt", "note": "x"},
         "blocks.0.w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
         "blocks.0.b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]},
         "s": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [24, 28]}}
DATA = bytes(range(28))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 60, max_value=2 ** 200)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _replace(header: dict, path: list, value):
    """Put `value` at the place `path` (indices into keys) reaches, as deep as it goes."""
    node = header
    for index in path[:-1]:
        if not isinstance(node, dict) or not node:
            break
        child = list(node)[index % len(node)]
        if not isinstance(node[child], (dict, list)) or len(path) == 1:
            node[child] = value
            return header
        node = node[child] if isinstance(node[child], dict) else {"_": node[child]}
    if isinstance(node, dict) and node:
        node[list(node)[path[-1] % len(node)]] = value
    return header


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("replace"), st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=3),
                                            JSON_VALUES)),
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("bigint"), st.tuples(st.integers(0, 10 ** 6),
                                           st.sampled_from([2 ** 63, 2 ** 64 + 1, 10 ** 30, -1]))),
    st.tuples(st.just("brackets"), st.tuples(st.integers(0, 10 ** 6), st.integers(1, 3000))),
    st.tuples(st.just("field"), st.tuples(
        st.integers(0, 2), st.sampled_from(["shape", "data_offsets"]),
        st.lists(st.one_of(st.integers(0, 30), st.integers(-2, 2 ** 64), st.just(0)), max_size=8))),
)


def mutate(kind: str, arg) -> bytes:
    text = json.dumps(VALID).encode()
    if kind == "flip":
        raw = bytearray(text)
        for pos, byte in arg:
            raw[pos % len(raw)] = byte
        return bytes(raw)
    if kind == "replace":
        return json.dumps(_replace(json.loads(text), *arg)).encode()
    if kind == "truncate":
        return text[:arg]
    if kind == "field":
        header = json.loads(text)
        header[[k for k in header if k != "__metadata__"][arg[0]]][arg[1]] = arg[2]
        return json.dumps(header).encode()
    digits = [i for i, c in enumerate(text) if chr(c).isdigit()]
    pos = digits[arg[0] % len(digits)] if kind == "bigint" else arg[0] % len(text)
    insert = str(arg[1]).encode() if kind == "bigint" else b"[" * arg[1]
    return text[:pos] + insert + text[pos + (kind == "bigint"):]


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@settings(max_examples=600, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=MUTATIONS, data_cut=st.one_of(st.just(0), st.integers(-4, 4)),
       claim=st.one_of(st.just(0), st.integers(-3, 3), st.integers(0, 2 ** 64 - 1)))
def test_fuzzed_headers_raise_only_checkpoint_error(fuzz_dir, mutation, data_cut, claim):
    """Mutated headers (byte flips, JSON values swapped for random ones, truncation, big ints,
    bracket runs), wrong data lengths and header lengths: loaded consistently, or refused."""
    header = mutate(*mutation)
    data = DATA[:len(DATA) + data_cut] if data_cut < 0 else DATA + bytes(data_cut)
    claim = claim if claim > 3 else max(0, len(header) + claim)
    path = write_raw(fuzz_dir, header, data, header_len=claim)
    try:
        tensors = load_tensors(path)
    except CheckpointError as exc:
        assert NAME in str(exc) and len(str(exc)) < MAX_MESSAGE, str(exc)
        event(f"{mutation[0]}: refused")
        return
    event(f"{mutation[0]}: loaded")
    infos = ck.read_header(path)[0]
    assert sum(info.nbytes for info in infos.values()) == len(data)
    for key, t in tensors.items():
        assert tuple(t.shape) == infos[key].shape and math.prod(t.shape) * t.element_size() == \
            infos[key].nbytes
