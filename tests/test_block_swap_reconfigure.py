"""BlockSwap re-configuration: a model ComfyUI caches across prompts keeps its streamer, and the
next prompt's settings (prefetch, pinning, non-block offload, blocks_to_swap, auto sizing for
another resolution) take effect on the same model object. For each change: the new setting shows
in the streamer's state, only what the change needs is rebuilt, outputs stay bit-identical to the
resident model on CPU, and the layout invariant holds after every move."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanvideo_infinitetalk.wanvideo import block_swap as block_swap_module
from wanvideo_infinitetalk.wanvideo import placement, swap_groups
from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap, install
from wanvideo_infinitetalk.wanvideo.swap_groups import non_block_tensors
from wanvideo_infinitetalk.wanvideo.swap_sizing import (estimate_activation_bytes,
                                                        estimate_blocks_to_swap)

from test_block_swap import (FUZZ, LayoutWatch, assert_consistent, block_nbytes,
                             forward_interrupted, fuzz_model_and_reference)
from test_block_swap import one_cpu_thread  # noqa: F401  (autouse: one thread here too)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forward(model):
    _, args, _ = fuzz_model_and_reference()
    with torch.no_grad():
        return model(*args)


def reference():
    return fuzz_model_and_reference()[2]


@pytest.fixture
def fuzz():
    """The shared FUZZ model with a fresh LayoutWatch; always detached (resident again) after."""
    model, _, _ = fuzz_model_and_reference()
    watch = LayoutWatch()
    yield model, watch
    streamer = model.block_streamer
    if streamer is not None:
        streamer.detach(model, to="cpu")
    assert model.block_streamer is None and placement.check_layout(model) == []


def in_flat(t: torch.Tensor, flat: torch.Tensor) -> bool:
    return flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel()


def check_state(model, swap):
    """The streamer's state is what its settings say, between forwards."""
    layers = len(model.blocks)
    assert swap.swapped_blocks == list(range(layers - swap.blocks_to_swap, layers))
    if swap.requested != "auto":
        assert swap.blocks_to_swap == swap.requested
    flats = [swap.master_of(i).flat for i in swap.swapped_blocks]
    for i in range(layers):
        if i in swap.swapped_blocks:
            assert swap.master_of(i).pinned == swap.pin
            continue
        for name, t in placement.named_tensors(model.blocks[i]):
            assert t.device == swap.device, f"resident block {i} {name} on {t.device}"
            assert not any(in_flat(t, f) for f in flats)
    nb = swap._non_blocks
    assert (nb is not None) == swap.offload_non_blocks
    for name, t in non_block_tensors(model):
        if nb is not None:
            assert in_flat(t, nb.flat) or t.numel() == 0, name
        else:
            assert t.device == swap.device, name
    assert_consistent(model, swap)


@pytest.fixture
def fake_pinning(monkeypatch):
    """Pinning needs CUDA; on CPU, pretend it is available and record what was asked for (the
    buffers are ordinary host memory), so the re-pack rules can be checked anywhere."""
    asked = []
    real = placement.pack_flat

    def pack_flat(tensors, device, pin=False, **kw):
        asked.append(pin)
        return real(tensors, device, pin=False, **kw)

    monkeypatch.setattr(block_swap_module, "_can_pin", lambda device: True)
    monkeypatch.setattr(swap_groups.placement, "pack_flat", pack_flat)
    return asked


def attached(fuzz, blocks, **settings):
    """(model, watch, swap): the fuzz model with a streamer, after one forward equal to resident."""
    model, watch = fuzz
    swap = BlockSwap(blocks, "cpu", on_move=watch, **settings).attach(model)
    watch.swap = swap
    assert torch.equal(forward(model), reference())
    return model, watch, swap


# ----------------------------------------------------------------------------- one setting each

def test_prefetch_change_resizes_the_slot_ring_and_keeps_host_masters(fuzz):
    model, watch, swap = attached(fuzz, 4, prefetch=1, release_after_run=False)
    assert len(swap._stream.run.slots) == 2
    flats = {i: swap.master_of(i).flat for i in swap.swapped_blocks}
    packed = swap.host_buffers_allocated
    swap.configure(prefetch=3)
    assert swap._stream.run is None                      # the old ring is gone at once
    assert torch.equal(forward(model), reference())
    assert len(swap._stream.run.slots) == 4 and swap.stats()["prefetch"] == 3
    assert swap.host_buffers_allocated == packed          # nothing re-packed
    assert all(swap.master_of(i).flat is f for i, f in flats.items())
    swap.configure(prefetch=2)
    assert torch.equal(forward(model), reference()) and len(swap._stream.run.slots) == 3
    check_state(model, swap)
    assert watch.violations == []


def test_blocks_to_swap_change_packs_joining_blocks_and_places_leaving_ones(fuzz):
    model, watch, swap = attached(fuzz, 2)
    for n in (4, 1, 0, 5, 3):
        old = {i: swap.master_of(i).flat for i in swap.swapped_blocks}
        packed = swap.host_buffers_allocated
        swap.configure(blocks_to_swap=n)
        joining = set(swap.swapped_blocks) - set(old)
        assert swap.blocks_to_swap == n and swap.stats()["blocks_swapped"] == n
        assert swap.host_buffers_allocated - packed == len(joining)
        for i in set(swap.swapped_blocks) & set(old):
            assert swap.master_of(i).flat is old[i]      # staying blocks keep their master
        for i in set(old) - set(swap.swapped_blocks):    # leaving blocks own fresh storage
            assert not any(in_flat(t, old[i]) for _, t in placement.named_tensors(model.blocks[i]))
        check_state(model, swap)
        swap.reset_stats()
        assert torch.equal(forward(model), reference())
        assert swap.stats()["bytes_moved"] == sum(swap.master_of(i).used
                                                  for i in swap.swapped_blocks)
    assert watch.violations == []


def test_offload_non_blocks_toggles_between_runs(fuzz):
    model, watch, swap = attached(fuzz, 2)
    masters = {i: swap.master_of(i).flat for i in swap.swapped_blocks}
    for offload in (True, False, True):
        packed = swap.host_buffers_allocated
        swap.configure(offload_non_blocks=offload)
        assert swap.stats()["offload_non_blocks"] is offload
        assert swap.host_buffers_allocated - packed == int(offload)   # only the non-blocks
        assert all(swap.master_of(i).flat is f for i, f in masters.items())
        check_state(model, swap)
        swap.reset_stats()
        assert torch.equal(forward(model), reference())
        nb_bytes = swap._non_blocks.used if offload else 0
        assert swap.stats()["bytes_moved"] == nb_bytes + sum(swap.master_of(i).used
                                                             for i in swap.swapped_blocks)
        check_state(model, swap)
    assert watch.violations == []


def test_pin_change_repacks_every_master_once(fuzz, fake_pinning):
    model, watch = fuzz
    swap = BlockSwap(3, "cpu", pin=False, offload_non_blocks=True, on_move=watch).attach(model)
    watch.swap = swap
    assert not swap.pin and not any(fake_pinning)
    assert torch.equal(forward(model), reference())
    packed = swap.host_buffers_allocated
    swap.configure(pin=True)
    assert swap.pin and swap.stats()["pinned"]
    assert swap.host_buffers_allocated - packed == 3 + 1             # 3 blocks + the non-blocks
    assert fake_pinning[-4:] == [True] * 4
    assert swap._non_blocks.pinned and all(swap.master_of(i).pinned for i in swap.swapped_blocks)
    check_state(model, swap)
    assert torch.equal(forward(model), reference())
    swap.configure(pin=True, log_stats=True)                          # same pinning: no re-pack
    assert swap.host_buffers_allocated - packed == 4
    swap.configure(pin=False, blocks_to_swap=4)        # re-pinned, and one block joins unpinned
    assert swap.host_buffers_allocated - packed == 4 + 4 + 1
    check_state(model, swap)
    assert torch.equal(forward(model), reference())
    assert watch.violations == []


def _auto_memory(model, tokens_for_three):
    """Fake free memory: room for 2 resident blocks and 2 slots at `tokens_for_three` tokens, and
    the swap count the policy gives for `tokens` under it."""
    blocks = [block_nbytes(b) for b in model.blocks]
    non_block = sum(t.numel() * t.element_size() for n, t in placement.named_tensors(model)
                    if not n.startswith("blocks."))

    def act(tokens):
        return estimate_activation_bytes(tokens, FUZZ.dim, FUZZ.ffn_dim, 4, FUZZ.text_len + 257)

    total = non_block + act(tokens_for_three) + 4 * blocks[0] + 1000
    on_device = non_block + sum(blocks)      # CPU "device": everything counts as placed
    expected = lambda tokens: estimate_blocks_to_swap(total, blocks, non_block, act(tokens))  # noqa: E731
    return (lambda: (total - on_device, 10 ** 12)), expected


def test_auto_resizes_for_each_run_resolution(fuzz):
    model, watch = fuzz
    memory_info, expected = _auto_memory(model, 2000)
    swap = BlockSwap("auto", "cpu", tokens=2000, reserve_bytes=0, memory_info=memory_info,
                     on_move=watch).attach(model)
    watch.swap = swap
    assert swap.blocks_to_swap == 3
    assert torch.equal(forward(model), reference())
    runs = (2060, 40_000, 2000, 10)
    assert [expected(t) for t in runs] == [4, 5, 3, 0]
    for tokens in runs:
        swap.configure(tokens=tokens)
        assert swap.blocks_to_swap == expected(tokens), tokens
        assert swap.stats()["blocks_swapped"] == expected(tokens) and swap.stats()["auto"]
        check_state(model, swap)
        assert torch.equal(forward(model), reference())
    assert watch.violations == []


def test_install_takes_exactly_the_new_prompt_settings(fuzz):
    """The sampler's path: install on a cached model reconfigures its streamer; what the new
    settings leave out is back at its default, as on a fresh install."""
    model, watch = fuzz
    memory_info, _ = _auto_memory(model, 2000)
    swap = install(model, 3, "cpu", prefetch=2, offload_non_blocks=True, on_move=watch)
    watch.swap = swap
    assert torch.equal(forward(model), reference())
    again = install(model, 2, "cpu", on_move=watch)
    assert again is swap and model.block_streamer is swap
    assert (swap.blocks_to_swap, swap.prefetch, swap.offload_non_blocks) == (2, 1, False)
    check_state(model, swap)
    assert torch.equal(forward(model), reference())
    install(model, "auto", "cpu", tokens=2000, reserve_bytes=0, memory_info=memory_info,
            on_move=watch)
    assert swap.blocks_to_swap == 3 and swap.requested == "auto"
    assert torch.equal(forward(model), reference())
    assert watch.violations == []


def test_non_block_tensors_replaced_after_attach_are_repacked(fuzz):
    """A non-block weight replaced on the cached model (a LoRA merge, say) is streamed from its
    new storage at the next forward, like a replaced block tensor."""
    model, watch, swap = attached(fuzz, 2, offload_non_blocks=True)
    old, packed = swap._non_blocks, swap.host_buffers_allocated
    fresh = placement.set_tensor(model, "head.head.weight", model.head.head.weight)
    assert not in_flat(fresh, old.flat)
    assert torch.equal(forward(model), reference())
    assert swap.host_buffers_allocated == packed + 1 and swap._non_blocks is not old
    assert in_flat(model.head.head.weight, swap._non_blocks.flat)
    check_state(model, swap)
    assert watch.violations == []


def test_invalid_reconfigure_changes_nothing(fuzz):
    model, _ = fuzz
    swap = BlockSwap(2, "cpu", prefetch=2).attach(model)
    before = swap.settings
    with pytest.raises(ValueError, match="prefetch"):
        swap.configure(prefetch=4)
    with pytest.raises(ValueError, match=r"blocks_to_swap=6.*only 5 blocks"):
        swap.configure(blocks_to_swap=6)
    with pytest.raises(ValueError, match="tokens"):
        swap.configure(blocks_to_swap="auto", memory_info=lambda: (10 ** 9, 10 ** 9))
    assert swap.settings == before and swap.swapped_blocks == [3, 4]
    check_state(model, swap)
    assert torch.equal(forward(model), reference())


def test_configure_during_a_forward_is_refused(fuzz):
    model, _ = fuzz
    swap = BlockSwap(2, "cpu").attach(model)
    seen = []

    def reconfigure(*_):
        with pytest.raises(RuntimeError, match="during a forward"):
            swap.configure(prefetch=2)
        seen.append(True)

    hook = model.blocks[3].register_forward_pre_hook(reconfigure)
    try:
        assert torch.equal(forward(model), reference())
    finally:
        hook.remove()
    assert seen == [True] and swap.prefetch == 1


# ----------------------------------------------------------------------------- fuzzing

SETTINGS = st.fixed_dictionaries({
    "blocks_to_swap": st.one_of(st.integers(0, FUZZ.num_layers), st.just("auto")),
    "tokens": st.sampled_from([10, 1000, 2000, 40_000]),
    "prefetch": st.integers(1, 3), "offload_non_blocks": st.booleans(), "pin": st.booleans(),
    "release_after_run": st.booleans()})
RUN = st.one_of(st.none(), st.tuples(st.integers(0, FUZZ.num_layers - 1), st.booleans()))


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(SETTINGS, RUN), min_size=2, max_size=4))
def test_fuzzed_reconfigure_sequences_keep_layout_and_outputs(fake_pinning, steps):
    model, args, ref = fuzz_model_and_reference()
    memory_info, _ = _auto_memory(model, 2000)
    watch = LayoutWatch()
    try:
        for wanted, run in steps:
            swap = install(model, device="cpu", reserve_bytes=0, memory_info=memory_info,
                           on_move=watch, **wanted)
            watch.swap = swap
            check_state(model, swap)
            assert (swap.prefetch, swap.pin) == (wanted["prefetch"], wanted["pin"])
            if run is not None:
                forward_interrupted(model, args, *run)
                check_state(model, swap)
            assert torch.equal(forward(model), ref)
            check_state(model, swap)
        assert watch.violations == []
    finally:
        if model.block_streamer is not None:
            model.block_streamer.detach(model, to="cpu")
    assert placement.check_layout(model) == []


# ----------------------------------------------------------------------------- the sampler node

NODE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {wanvideo!r})
    import _pack
    sys.path.pop(0)
    _pack.load_pack()
    sys.path[:0] = [{comfy!r}, {tests!r}]
    import torch
    from wanvideo_infinitetalk.nodes import sampler
    from wanvideo_infinitetalk.nodes.types import BlockSwapArgs
    from test_block_swap import FUZZ, build, inputs

    model, args = build(FUZZ), inputs(FUZZ)
    with torch.no_grad():
        ref = model(*args)
    first = sampler.prepare_block_swap(model, BlockSwapArgs(blocks_to_swap=2, prefetch=1), "cpu")
    with torch.no_grad():
        assert torch.equal(model(*args), ref)
    second = sampler.prepare_block_swap(
        model, BlockSwapArgs(blocks_to_swap=4, prefetch=3, offload_non_block=True), "cpu")
    assert second is first and model.block_streamer is first
    s = second.stats()
    assert (s["blocks_swapped"], s["prefetch"], s["offload_non_blocks"]) == (4, 3, True), s
    with torch.no_grad():
        assert torch.equal(model(*args), ref)

    class Handle:                          # a WANVIDEOMODEL whose settings got disconnected
        pass
    handle = Handle(); handle.model = model; handle.device = "cpu"
    third = sampler._block_swap(handle, None, "cpu", (1, 16, 2, 4, 6))
    assert third is first and third.requested == "auto" and third.blocks_to_swap == 0
    assert third.prefetch == 1 and not third.offload_non_blocks
    with torch.no_grad():
        assert torch.equal(model(*args), ref)
    print("node ok")
""")


def test_sampler_prepare_block_swap_reconfigures_the_cached_model():
    comfy = os.path.join(ROOT, ".cache", "ComfyUI")
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        pytest.skip("ComfyUI is not extracted: run `make setup`")
    script = NODE_SCRIPT.format(comfy=comfy, tests=os.path.join(ROOT, "tests"),
                                wanvideo=os.path.join(ROOT, "wanvideo"))
    env = dict(os.environ, WANVIDEO_CHECK_LAYOUT="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0 and "node ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_cuda_reconfigure_each_setting_bit_identical():
    """Real pinning, a real copy stream and events: every change between runs takes effect, the
    outputs stay bit-identical to resident, and VRAM follows the swap count."""
    from test_block_swap import cuda_bf16_model

    model, args, ref = cuda_bf16_model()
    watch = LayoutWatch()
    swap = BlockSwap(3, "cuda", pin=False, on_move=watch).attach(model)
    watch.swap = swap
    assert not swap.pin and not swap.master_of(4).flat.is_pinned()
    for change in (dict(pin=True), dict(prefetch=3), dict(offload_non_blocks=True),
                   dict(blocks_to_swap=5, prefetch=1), dict(blocks_to_swap=1, pin=False),
                   dict(offload_non_blocks=False, blocks_to_swap=4, pin=True)):
        torch.cuda.synchronize()
        before, n_before = torch.cuda.memory_allocated(), swap.blocks_to_swap
        swap.configure(**change)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        if swap.blocks_to_swap > n_before:
            assert grown < 0, (change, grown)       # blocks left the device
        elif swap.blocks_to_swap < n_before:
            assert grown > 0, (change, grown)
        groups = [swap.master_of(i) for i in swap.swapped_blocks] + [swap._non_blocks] * (
            swap._non_blocks is not None)
        assert all(g.flat.is_pinned() == swap.pin == g.pinned for g in groups), change
        check_state(model, swap)
        swap.reset_stats()
        with torch.no_grad():
            outs = [model(*args) for _ in range(2)]
        assert all(torch.equal(o, ref) for o in outs), change
        s = swap.stats()
        assert (s["prefetch"], s["blocks_swapped"], s["pinned"]) == (
            swap.prefetch, swap.blocks_to_swap, swap.pin)
        assert s["bytes_moved"] > 0 and s["copy_ms"] > 0
        check_state(model, swap)
    assert watch.violations == []
    swap.detach(model, to="cuda")


@pytest.mark.gpu
def test_cuda_auto_resizes_for_new_tokens():
    from test_block_swap import build, inputs

    model = build(FUZZ, torch.bfloat16, "cuda")
    args = inputs(FUZZ, "cuda", torch.bfloat16)
    with torch.no_grad():
        ref = model(*args)
    blocks = [block_nbytes(b) for b in model.blocks]
    non_block = sum(t.numel() * t.element_size() for n, t in placement.named_tensors(model)
                    if not n.startswith("blocks."))

    def act(tokens):
        return estimate_activation_bytes(tokens, FUZZ.dim, FUZZ.ffn_dim, 2, FUZZ.text_len + 257)

    total = non_block + act(1000) + 4 * blocks[0] + 1000   # 2 resident + 2 slots at 1000 tokens

    def memory_info():            # what is free now = total minus what the model holds on CUDA
        held = sum(t.numel() * t.element_size() for _, t in placement.named_tensors(model)
                   if t.device.type == "cuda")
        return total - held, 10 ** 12

    swap = BlockSwap("auto", "cuda", tokens=1000, reserve_bytes=0,
                     memory_info=memory_info).attach(model)
    assert swap.blocks_to_swap == 3
    for tokens in (100_000, 10, 1000):
        swap.configure(tokens=tokens)
        assert swap.blocks_to_swap == estimate_blocks_to_swap(total, blocks, non_block, act(tokens))
        check_state(model, swap)
        with torch.no_grad():
            assert torch.equal(model(*args), ref)
    assert {swap.blocks_to_swap} == {3}
    swap.detach(model, to="cuda")
