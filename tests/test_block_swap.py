"""BlockSwap: swapped forwards are bit-identical to resident ones, the layout invariant holds after
every move (fuzzed, interrupts included), bytes follow each block's actual storage, host memory
stays flat, and the model is consistent after an interrupt."""
from __future__ import annotations

import functools
import gc
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.block_swap import (BlockSwap, estimate_activation_bytes,
                                                       estimate_blocks_to_swap)
from wanvideo_infinitetalk.wanvideo.config import WanConfig
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy
from wanvideo_infinitetalk.wanvideo.model import WanLayerNorm
from wanvideo_infinitetalk.wanvideo.swap_sizing import free_device_bytes
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict

# Small enough for hundreds of forwards on two CPU cores; five blocks so N/prefetch vary.
FUZZ = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=5, in_dim=36, out_dim=16,
                 text_dim=32, text_len=16, clip_dim=32, has_image_embedding=True)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes
    them 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupt(Exception):
    """Stands in for ComfyUI's interrupt, which arrives as an exception from a callback."""


def build(cfg, dtype=torch.float32, device="cpu", seed=0):
    model = build_meta_model(cfg)
    placement.materialize(model, random_state_dict(cfg, seed), torch.device(device),
                          dtype_for=storage_dtype_policy(dtype))
    model.compute_dtype = dtype
    return model.eval()


def inputs(cfg, device="cpu", dtype=torch.float32, lat=2, size=(4, 6), clip_tokens=7, text=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, lat, *size, generator=g)
    t = torch.tensor([637.0])
    ctx = torch.randn(1, text, cfg.text_dim, generator=g)
    clip = torch.randn(1, clip_tokens, cfg.clip_dim, generator=g)
    y = torch.randn(1, cfg.in_dim - 16, lat, *size, generator=g)
    return tuple(v.to(device=device, dtype=dtype if v.dim() > 1 else torch.float32)
                 for v in (x, t, ctx, clip, y))


class FakeAudioLayer(nn.Module):
    """Shapes like InfiniteTalk's audio_cross_attn plus quantized-style storage: an fp8 weight,
    an fp32 scale and an odd-sized uint8 buffer (so later sub-views would misalign if packing
    did not pad). Unused by the forward without audio; its bytes must move anyway."""

    def __init__(self, dim):
        super().__init__()
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(48, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("weight_fp8", torch.randn(dim, 32).to(torch.float8_e4m3fn))
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("odd", torch.arange(3, dtype=torch.uint8))


def add_fake_audio_layers(model):
    dim = model.config.dim
    for block in model.blocks:
        block.norm_x = WanLayerNorm(dim, elementwise_affine=True)
        block.audio_cross_attn = FakeAudioLayer(dim)
    return model


def block_nbytes(block):
    seen = {id(t): t for _, t in placement.named_tensors(block)}
    return sum(t.numel() * t.element_size() for t in seen.values())


class LayoutWatch:
    """on_move hook: runs the layout checker after every move and, for an onloaded block,
    checks every one of its tensors lies inside the swap's device slots."""

    def __init__(self):
        self.violations, self.moves, self.swap = [], 0, None

    def __call__(self, event, index, module):
        self.moves += 1
        self.violations += placement.check_layout(module)
        if event == "onload" and index is not None and self.swap is not None:
            slots = self.swap._stream.run.slots.buffers
            for name, t in placement.named_tensors(module):
                if not any(s.data_ptr() <= t.data_ptr() < s.data_ptr() + s.numel() for s in slots):
                    self.violations.append(f"block {index} {name} not in a slot")


def attach(model, n, watch=None, **kw):
    swap = BlockSwap(n, kw.pop("device", "cpu"), on_move=watch, **kw)
    if watch is not None:
        watch.swap = swap
    return swap.attach(model)


def assert_consistent(model, swap):
    for i in swap.swapped_blocks:
        assert swap.points_at_master(i), f"block {i} does not point at its host master"
    run = swap._stream.run
    assert run is None or not run.on_slot
    assert not swap._stream.nb_on_device and not swap._stream.in_forward
    assert placement.check_layout(model) == []


@functools.lru_cache(maxsize=None)
def fuzz_model_and_reference():
    model = build(FUZZ)
    args = inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
    return model, args, ref


def forward_interrupted(model, args, block, after):
    """Run a forward that raises Interrupt inside block `block` (before or after its compute)."""
    def boom(*_):
        raise Interrupt()
    hook = (model.blocks[block].register_forward_hook(boom) if after
            else model.blocks[block].register_forward_pre_hook(boom))
    try:
        with pytest.raises(Interrupt), torch.no_grad():
            model(*args)
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- equality

@pytest.mark.parametrize("n,prefetch,offload", [(0, 1, False), (1, 1, False), (2, 1, True),
                                                (2, 2, False), (2, 3, True)])
def test_swapped_forward_bit_identical_tiny_i2v(n, prefetch, offload):
    model = build(TINY_I2V)
    args = inputs(TINY_I2V, clip_tokens=257)
    with torch.no_grad():
        ref = model(*args)
        watch = LayoutWatch()
        swap = attach(model, n, watch, prefetch=prefetch, offload_non_blocks=offload)
        out = model(*args)
        out2 = model(*args)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert watch.violations == [] and (watch.moves > 0 or n == 0 and not offload)
    stats = swap.stats()
    assert stats["blocks_swapped"] == n and stats["forwards"] == 2
    moved = 2 * sum(swap.master_of(i).used for i in swap.swapped_blocks)
    if offload:
        moved += 2 * swap._non_blocks.used
    assert stats["bytes_moved"] == moved
    assert_consistent(model, swap)
    assert set(model.state_dict()) == set(build_meta_model(TINY_I2V).state_dict())
    swap.detach(model, to="cpu")
    assert model.block_streamer is None
    with torch.no_grad():
        assert torch.equal(model(*args), ref)


def test_bytes_follow_storage_with_extra_submodules():
    model = add_fake_audio_layers(build(FUZZ))
    args = inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
        watch = LayoutWatch()
        swap = attach(model, 3, watch, prefetch=2)
        assert torch.equal(model(*args), ref)
    assert watch.violations == []
    for i in swap.swapped_blocks:
        master = swap.master_of(i)
        assert master.tensor_bytes == block_nbytes(model.blocks[i])
        assert block_nbytes(model.blocks[i].audio_cross_attn) > 0
        names = {n for n, _ in placement.named_tensors(model.blocks[i])}
        assert {"norm_x.weight", "audio_cross_attn.weight_fp8", "audio_cross_attn.scale",
                "audio_cross_attn.odd"} <= names
        assert model.blocks[i].audio_cross_attn.weight_fp8.dtype == torch.float8_e4m3fn
    assert swap.stats()["bytes_moved"] == sum(swap.master_of(i).used for i in swap.swapped_blocks)


def test_block_changed_after_attach_is_repacked():
    """Layers injected (or quantized) after attach: the next forward streams the new storage."""
    model = build(FUZZ)
    args = inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
        swap = attach(model, 2, LayoutWatch())
        before = swap.master_of(4).used
        add_fake_audio_layers(model)
        assert torch.equal(model(*args), ref)
    assert swap.master_of(4).used > before
    assert swap.master_of(4).tensor_bytes == block_nbytes(model.blocks[4])
    assert_consistent(model, swap)


# ----------------------------------------------------------------------------- fuzzing

@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, FUZZ.num_layers), prefetch=st.integers(1, 3), offload=st.booleans(),
       release=st.booleans(),
       runs=st.lists(st.one_of(st.none(), st.tuples(st.integers(0, FUZZ.num_layers - 1),
                                                    st.booleans())), min_size=1, max_size=2))
def test_fuzzed_swap_sequences_keep_layout_and_outputs(n, prefetch, offload, release, runs):
    model, args, ref = fuzz_model_and_reference()
    watch = LayoutWatch()
    swap = attach(model, n, watch, prefetch=prefetch, offload_non_blocks=offload,
                  release_after_run=release)
    try:
        for interrupt in runs:
            if interrupt is None:
                with torch.no_grad():
                    assert torch.equal(model(*args), ref)
            else:
                forward_interrupted(model, args, *interrupt)
            assert_consistent(model, swap)
            if release:
                assert swap._stream.run is None and swap._stream.nb_slot is None
        with torch.no_grad():      # whatever happened before, the next run succeeds
            assert torch.equal(model(*args), ref)
        assert watch.violations == []
    finally:
        swap.detach(model, to="cpu")
    assert model.block_streamer is None and placement.check_layout(model) == []


# ----------------------------------------------------------------------------- robustness

def test_interrupt_leaves_model_consistent_and_next_run_succeeds():
    model, args, ref = fuzz_model_and_reference()
    swap = attach(model, 4, LayoutWatch(), prefetch=2, offload_non_blocks=True,
                  release_after_run=False)
    try:
        forward_interrupted(model, args, 2, after=False)
        assert_consistent(model, swap)
        assert swap.stats()["interrupted"] == 1
        model.state_dict()
        with torch.no_grad():
            assert torch.equal(model(*args), ref)
        assert swap._stream.run is not None   # kept for the next forward...
        swap.release()
        assert swap._stream.run is None       # ...until released
    finally:
        swap.detach(model, to="cpu")


def test_error_before_blocks_offloads_non_blocks():
    model, args, _ = fuzz_model_and_reference()
    swap = attach(model, 2, offload_non_blocks=True)
    try:
        with pytest.raises(ValueError), torch.no_grad():
            model(args[0], args[1], args[2], None, args[4])      # I2V without clip_fea
        assert_consistent(model, swap)
    finally:
        swap.detach(model, to="cpu")


def test_detach_without_device_keeps_host_masters():
    model = build(FUZZ)
    args = inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
    swap = attach(model, 5)
    flats = [swap.master_of(i).flat for i in range(5)]
    swap.detach(model)
    assert model.block_streamer is None and not model._forward_hooks and not model._forward_pre_hooks
    for block, flat in zip(model.blocks, flats):
        p = block.ffn[0].weight
        assert flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel()
    with torch.no_grad():
        assert torch.equal(model(*args), ref)


def test_host_memory_flat_over_20_forwards():
    psutil = pytest.importorskip("psutil")
    model = build(TINY_I2V)
    args = inputs(TINY_I2V, clip_tokens=257)
    swap = attach(model, 2, offload_non_blocks=True)
    proc = psutil.Process(os.getpid())
    with torch.no_grad():
        for _ in range(3):
            model(*args)
        gc.collect()
        buffers, rss = swap.host_buffers_allocated, proc.memory_info().rss
        for _ in range(20):
            out = model(*args)
            del out
        gc.collect()
    assert swap.host_buffers_allocated == buffers
    grown = proc.memory_info().rss - rss
    per_forward_moved = swap.master_of(0).used + swap.master_of(1).used + swap._non_blocks.used
    assert grown < max(16 * 2 ** 20, 2 * per_forward_moved), grown


def test_invalid_arguments():
    model = build(FUZZ)
    with pytest.raises(ValueError, match=r"blocks_to_swap=6.*only 5 blocks"):
        BlockSwap(6, "cpu").attach(model)
    assert model.block_streamer is None
    with pytest.raises(ValueError, match="prefetch"):
        BlockSwap(1, "cpu", prefetch=4)
    with pytest.raises(ValueError):
        BlockSwap(-1, "cpu")
    with pytest.raises(ValueError, match="tokens"):
        BlockSwap("auto", "cpu", memory_info=lambda: (10 ** 9, 10 ** 9)).attach(model)


# ----------------------------------------------------------------------------- sizing

def test_estimate_blocks_to_swap_fake_numbers():
    blocks = [100] * 10
    # everything fits
    assert estimate_blocks_to_swap(2000, blocks, 50, 200) == 0
    # budget 1000 - 50 - 200 = 750: resident 10-n blocks + 2 slots of 100 -> n = 5 (500 + 200)
    assert estimate_blocks_to_swap(1000, blocks, 50, 200, prefetch=1) == 5
    # deeper prefetch costs one more slot -> one more block swapped
    assert estimate_blocks_to_swap(1000, blocks, 50, 200, prefetch=2) == 6
    assert estimate_blocks_to_swap(1000, blocks, 50, 200, prefetch=1, reserve_bytes=100) == 6
    # nothing fits: swap all
    assert estimate_blocks_to_swap(100, blocks, 50, 200) == 10
    # fewer swapped blocks than slots saves nothing: budget 990 with 4 slots -> n = 5
    assert estimate_blocks_to_swap(1040, blocks, 0, 50, prefetch=3) == 5


def test_activation_estimate_formula():
    assert estimate_activation_bytes(10, 8, 16, 2, context_tokens=3) == \
        10 * (8 * 40 + 2 * 16 * 2) + 3 * 8 * 8
    big = estimate_activation_bytes(32760, 5120, 13824, 2)
    assert 5e9 < big < 10e9


def test_auto_mode_uses_free_memory():
    model = build(FUZZ)
    args = inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
    per_block = block_nbytes(model.blocks[0])
    non_block = sum(t.numel() * t.element_size() for n, t in placement.named_tensors(model)
                    if not n.startswith("blocks."))
    tokens = 2000
    act = estimate_activation_bytes(tokens, FUZZ.dim, FUZZ.ffn_dim, 4, FUZZ.text_len + 257)
    # room for non-blocks, activations, 2 resident blocks and 2 slots -> swap 3 (of 5)
    free = non_block + act + 4 * per_block + 1000
    on_device = non_block + 5 * per_block            # CPU "device": everything counts as placed
    swap = BlockSwap("auto", "cpu", tokens=tokens, reserve_bytes=0,
                     memory_info=lambda: (free - on_device, 10 ** 12)).attach(model)
    assert swap.blocks_to_swap == 3 and swap.stats()["auto"]
    with torch.no_grad():
        assert torch.equal(model(*args), ref)
    assert_consistent(model, swap)
    swap.detach(model, to="cpu")


# ----------------------------------------------------------------------------- CUDA

def _cuda_model(cfg=TINY_I2V):
    return build(cfg, torch.bfloat16, "cuda")


def cuda_bf16_model():
    """(model, inputs, resident output): the fuzz model with InfiniteTalk-shaped layers in bf16
    on the GPU, for the CUDA tests here and in test_block_swap_reconfigure."""
    model = add_fake_audio_layers(build(FUZZ, torch.bfloat16, "cuda"))
    placement.move_module(model, "cuda", torch.bfloat16)
    args = inputs(FUZZ, "cuda", torch.bfloat16, lat=3, size=(8, 12))
    with torch.no_grad():
        ref = model(*args)
    return model, args, ref


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch,offload", [(1, False), (2, True), (3, False)])
def test_cuda_bf16_swapped_bit_identical(prefetch, offload):
    model, args, ref = cuda_bf16_model()
    with torch.no_grad():
        watch = LayoutWatch()
        swap = attach(model, FUZZ.num_layers, watch, device="cuda", prefetch=prefetch,
                      offload_non_blocks=offload)
        assert swap.pin
        outs = [model(*args) for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert watch.violations == []
    stats = swap.stats()
    assert stats["bytes_moved"] > 0 and stats["copy_ms"] > 0 and stats["peak_vram_bytes"] > 0
    swap.detach(model, to="cuda")


@pytest.mark.gpu
def test_cuda_interrupt_and_vram_returns_to_pre_run_level():
    model = _cuda_model()
    args = inputs(TINY_I2V, "cuda", torch.bfloat16, clip_tokens=257, lat=3, size=(8, 12))
    with torch.no_grad():
        ref = model(*args)
    swap = attach(model, 2, device="cuda", prefetch=1, offload_non_blocks=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    forward_interrupted(model, args, 1, after=False)
    torch.cuda.synchronize()
    assert_consistent(model, swap)
    assert abs(torch.cuda.memory_allocated() - before) <= 0.01 * before + 4096
    with torch.no_grad():
        out = model(*args)
    assert torch.equal(out, ref)
    del out
    torch.cuda.synchronize()
    assert abs(torch.cuda.memory_allocated() - before) <= 0.01 * before + 4096
    assert swap._stream.run is None
    swap.detach(model, to="cuda")


def test_infinitetalk_layers_stream_with_audio():
    """Real InfiniteTalk injection (norm_x, audio_cross_attn, audio_proj): with audio, one and two
    speakers, swapped + offloaded forwards equal resident ones and their bytes move."""
    inject = pytest.importorskip("wanvideo_infinitetalk.multitalk.inject")
    from wanvideo_infinitetalk.multitalk import tiny
    from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput

    model = build(TINY_I2V)
    inject.inject_infinitetalk(model, tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers),
                               "cpu", dtype=torch.float32)
    args = inputs(TINY_I2V, clip_tokens=257, size=(4, 4))
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 5, 5, 12, 768, generator=g)
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4], masks[1, :, 4:] = 1, 1
    audios = [AudioInput(feats[:1]), AudioInput(feats, masks=masks)]
    with torch.no_grad():
        refs = [model(*args, audio=a) for a in audios]
        watch = LayoutWatch()
        swap = attach(model, TINY_I2V.num_layers, watch, prefetch=1, offload_non_blocks=True)
        outs = [model(*args, audio=a) for a in audios]
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert watch.violations == []
    for i in swap.swapped_blocks:
        assert swap.master_of(i).tensor_bytes == block_nbytes(model.blocks[i])
        assert block_nbytes(model.blocks[i].audio_cross_attn) > 0
    assert any(n.startswith("audio_proj.") for n, _ in placement.named_tensors(model))
    assert_consistent(model, swap)


@pytest.mark.gpu
def test_cuda_auto_sizing_reads_real_free_memory():
    """auto with the real torch.cuda.mem_get_info: a tiny model fits whole (0 swapped); reserving
    the free memory forces streaming, and outputs stay bit-identical."""
    model = add_fake_audio_layers(build(FUZZ, torch.bfloat16, "cuda"))
    placement.move_module(model, "cuda", torch.bfloat16)
    args = inputs(FUZZ, "cuda", torch.bfloat16, lat=3, size=(8, 12))
    with torch.no_grad():
        ref = model(*args)
    tokens = 3 * 4 * 6
    swap = BlockSwap(blocks_to_swap="auto", device="cuda", tokens=tokens).attach(model)
    assert swap.stats()["blocks_swapped"] == 0
    swap.detach(model, to="cuda")
    # Reserving everything free now (the driver's free bytes plus PyTorch's unused cache) leaves
    # only the model's own bytes minus the activation estimate: the whole model cannot stay
    # resident, so at least one block must stream.
    free = free_device_bytes(torch.device("cuda", torch.cuda.current_device()))
    swap = BlockSwap(blocks_to_swap="auto", device="cuda", tokens=tokens,
                     reserve_bytes=free).attach(model)
    assert swap.stats()["blocks_swapped"] >= 1
    with torch.no_grad():
        assert torch.equal(model(*args), ref)
    swap.detach(model, to="cuda")
