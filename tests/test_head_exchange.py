"""head_exchange: the packing around the Ulysses all-to-alls, against a reference that picks every
(rank, piece, token) chunk by hand; the Triton kernel against the torch path (interpreter on CPU,
the real kernel on CUDA), byte for byte."""
from __future__ import annotations

import pytest
import torch
import triton_interpreter

from wanvideo_infinitetalk.wanvideo import head_exchange as hx

# (B, n, H, D, world, pieces)
SHAPES = [(1, 7, 8, 4, 2, 1), (1, 5, 8, 4, 2, 2), (2, 3, 12, 8, 2, 3), (1, 6, 16, 2, 4, 2)]


def _reference_send(qkv, world, pieces):
    b, n, h, d = qkv[0].shape
    hp = h // (world * pieces)
    send = torch.empty(pieces, len(qkv), world, b, n, hp, d, dtype=qkv[0].dtype)
    for p in range(pieces):
        for j in range(world):
            lo = (j * pieces + p) * hp
            for i, t in enumerate(qkv):
                send[p, i, j] = t[:, :, lo:lo + hp]
    return send


def _inputs(shape, dtype=torch.float32, device="cpu"):
    b, n, h, d, world, pieces = shape
    g = torch.Generator().manual_seed(sum(shape))
    qkv = tuple(torch.randn(b, n, h, d, generator=g).to(device, dtype) for _ in range(3))
    return qkv, world, pieces


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_reference(shape):
    qkv, world, pieces = _inputs(shape)
    b, n, h, d = qkv[0].shape
    send = torch.full((pieces, 3, world, b, n, h // (world * pieces), d), float("nan"))
    hx.pack(qkv, send)
    assert torch.equal(send, _reference_send(qkv, world, pieces))


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_one_tensor_at_a_time_fills_its_slot(shape):
    qkv, world, pieces = _inputs(shape)
    b, n, h, d = qkv[0].shape
    send = torch.full((pieces, 3, world, b, n, h // (world * pieces), d), float("nan"))
    for i, t in enumerate(qkv):
        hx.pack((t,), send, slot=i)
    assert torch.equal(send, _reference_send(qkv, world, pieces))
    with pytest.raises(ValueError, match="do not fit 3 slots"):
        hx.pack(qkv[:2], send, slot=2)


@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_inverts_a_single_tensor_pack(shape):
    qkv, world, pieces = _inputs(shape)
    got = _reference_send(qkv[:1], world, pieces)[:, 0]
    out = torch.full_like(qkv[0], float("nan"))
    hx.unpack(got.contiguous(), out)
    assert torch.equal(out, qkv[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_puts_own_slots_in_the_receive_buffer(shape):
    qkv, world, pieces = _inputs(shape)
    b, n, h, d = qkv[0].shape
    want = _reference_send(qkv, world, pieces)
    me = world - 1
    send, own = (torch.full_like(want, float("nan")) for _ in range(2))
    hx.pack(qkv, send, own=own, me=me)
    assert torch.equal(own[:, :, me], want[:, :, me])
    others = [j for j in range(world) if j != me]
    assert torch.equal(send[:, :, others], want[:, :, others])


def test_pack_reads_strided_token_views():
    """Views whose rows are not dense (a slice of a wider tensor) take the torch path, same bytes."""
    wide = torch.randn(1, 5, 16, 4)
    qkv = tuple(wide[:, :, 8 * i // 2:8 * i // 2 + 8] for i in range(3))
    send = torch.empty(1, 3, 2, 1, 5, 4, 4)
    hx.pack(qkv, send)
    assert torch.equal(send, _reference_send(qkv, 2, 1))


def _kernel_matches_torch(device, dtype):
    for shape in SHAPES:
        qkv, world, pieces = _inputs(shape, dtype, device)
        b, n, h, d = qkv[0].shape
        hp = h // (world * pieces)
        want = hx.pack(tuple(t.cpu() for t in qkv), torch.empty(pieces, 3, world, b, n, hp, d,
                                                                dtype=dtype))
        send = torch.zeros(pieces, 3, world, b, n, hp, d, dtype=dtype, device=device)
        hx._launch(list(qkv), send, world, pieces, to_exchange=True, slots=3)
        assert torch.equal(send.cpu(), want), shape
        # one tensor per launch, rank 1's slots into a second buffer, the others untouched there
        split, own = torch.zeros_like(send), torch.zeros_like(send)
        for i, t in enumerate(qkv):
            hx._launch([t], split, world, pieces, to_exchange=True, own=own, me=1, slots=3,
                       slot=i)
        assert torch.equal(own[:, :, 1].cpu(), want[:, :, 1]), shape
        assert torch.equal(split[:, :, 0].cpu(), want[:, :, 0]) and not own[:, :, 0].any(), shape
        assert not split[:, :, 1].any(), shape
        out = torch.zeros_like(qkv[0])
        hx._launch([out], send[:, 1].contiguous(), world, pieces, to_exchange=False)
        assert torch.equal(out, qkv[1]), shape


def _fused_norm_rope_writes_the_pack(device, dtype):
    """fused_ops.rms_norm_rope with `exchange` writes what rms_norm_rope then pack write, bit
    for bit: the other ranks' heads into send, rank `me`'s into `own` and nothing of them into
    send (pack's torch path writes them there too; nothing reads them)."""
    from wanvideo_infinitetalk.wanvideo import fused_ops

    # + 14B's 1,280-wide head groups, and a head dim that is no power of two (the rotation's
    # general path)
    for shape in SHAPES + [(1, 9, 20, 128, 2, 2), (1, 5, 4, 6, 2, 1)]:
        b, n, h, d, world, pieces = shape
        g = torch.Generator().manual_seed(n * h)
        x = torch.randn(b, n, h * d, generator=g).to(device, dtype)
        weight = (1 + 0.1 * torch.randn(h * d, generator=g)).to(device)
        angles = torch.rand(n, d // 2, generator=g) * 6
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        y = fused_ops.rms_norm_rope(x, weight, 1e-6, cos, sin, h).view(b, n, h, d)
        buf = (pieces, 3, world, b, n, h // (world * pieces), d)
        for me, slot in ((0, 0), (world - 1, 2)):
            want_send, want_own = (torch.zeros(buf, dtype=dtype, device=device) for _ in "ab")
            hx.pack((y,), want_send, own=want_own, me=me, slot=slot)
            send, own = (torch.zeros(buf, dtype=dtype, device=device) for _ in "ab")
            assert fused_ops.rms_norm_rope(x, weight, 1e-6, cos, sin, h,
                                           exchange=(send, own, me, slot)) is send
            others = [j for j in range(world) if j != me]
            assert torch.equal(own, want_own), (shape, me)
            assert torch.equal(send[:, :, others], want_send[:, :, others]), (shape, me)
            assert not send[:, :, me].any(), (shape, me)
    with pytest.raises(ValueError, match="do not fit x"):
        fused_ops.rms_norm_rope(x, weight, 1e-6, cos, sin, h, exchange=(send, own, 0, 3))


def test_kernel_under_triton_interpreter():
    """The Triton kernels' indexing on CPU tensors (TRITON_INTERPRET=1, chosen before triton is
    first imported, hence a fresh process)."""
    triton_interpreter.run("import test_head_exchange as t\n"
                           "t._kernel_matches_torch('cpu', torch.float32)\n"
                           "t._kernel_matches_torch('cpu', torch.bfloat16)\n"
                           "t._fused_norm_rope_writes_the_pack('cpu', torch.float32)\n"
                           "t._fused_norm_rope_writes_the_pack('cpu', torch.bfloat16)\n")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_torch_on_cuda(dtype):
    _kernel_matches_torch("cuda", dtype)
    _fused_norm_rope_writes_the_pack("cuda", dtype)
    # The public entry points pick the kernel for CUDA tensors with dense rows.
    qkv, world, pieces = _inputs((1, 300, 40, 128, 2, 2), dtype, "cuda")
    assert hx._use_kernel(list(qkv), torch.empty(2, 3, 2, 1, 300, 10, 128, dtype=dtype,
                                                 device="cuda"))


def _check_fused_writes(result: dict, blocks: int, tolerance: float) -> None:
    assert result["1spk"]["exchange_writes"] == 2 * blocks, result   # q and k of every block
    assert result["2spk"]["exchange_writes"] == blocks, result       # q kept for the speaker map
    for case in result.values():
        assert case["equal"], result
        assert case["vs_unsplit"] < tolerance, result


def test_split_forward_writes_q_and_k_straight_into_the_exchange(tmp_path):
    """Two gloo ranks run the tiny model's sharded forward with the fused kernels through
    Triton's interpreter: q and k reach the exchange from the norm + RoPE kernel, with the same
    bits as that kernel's output packed afterwards, and the split equals one process (fp32)."""
    import json

    import sp_worker

    triton_interpreter.run("import sp_worker, exchange_worker\n"
                           "sp_worker.spawn(exchange_worker.fused_writes, 2, "
                           f"{str(tmp_path)!r}, 300)\n")
    _check_fused_writes(json.loads((tmp_path / "fused.json").read_text()),
                        sp_worker.TINY_I2V_4_HEADS.num_layers, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_split_forward_writes_q_and_k_straight_into_the_exchange_on_two_gpus(tmp_path):
    """The same on two GPUs (NCCL, bf16, the compiled kernels)."""
    import json

    import exchange_worker
    import sp_worker

    sp_worker.spawn(exchange_worker.fused_writes, 2, str(tmp_path), 300)
    _check_fused_writes(json.loads((tmp_path / "fused.json").read_text()),
                        sp_worker.TINY_I2V_4_HEADS.num_layers, 2e-2)   # bf16, per head piece
