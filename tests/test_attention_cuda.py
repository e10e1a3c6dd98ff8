"""The CUDA 8-bit attention kernel without a GPU: NVRTC (shipped with PyTorch's CUDA wheels)
compiles it for sm_90a here, and ptxas's report says what the H200 runs rely on: no spills, the
register cap of a 384-thread CTA, no wgmma serialized. The GPU tests are in
tests/test_attention_int8.py (kernel against the reference, the Gluon kernel and fp32)."""
from __future__ import annotations

import re

import pytest

from wanvideo_infinitetalk.wanvideo import attention_int8_cuda_source as source
from wanvideo_infinitetalk.wanvideo import cuda_runtime


def _compile(stages: int, ptxas_report: bool = True, **options):
    """(cubin, log) of source.source(stages, **options); skips where NVRTC is missing."""
    try:
        return cuda_runtime.compile_cubin(source.source(stages, **options), "attention_int8.cu",
                                          options=("--ptxas-options=-v",) if ptxas_report else ())
    except cuda_runtime.CudaRuntimeError as exc:
        if "not found" in str(exc):
            pytest.skip(f"no NVRTC here: {exc}")
        raise


@pytest.mark.parametrize("stages,pingpong,pv_int8,lazy,multicast,static_max,v_direct", [
    (2, True, False, True, False, True, False), (3, True, False, True, False, True, False),
    (2, False, False, True, False, True, False), (3, True, True, True, False, True, False),
    (3, True, False, False, False, True, False), (3, True, False, True, True, True, False),
    (2, True, False, True, True, True, False), (3, True, False, True, False, False, False),
    (3, True, False, True, True, False, False), (3, True, False, True, False, True, True),
    (3, True, False, True, True, True, True), (2, True, False, True, False, False, True)])
def test_kernel_compiles_for_sm90a_without_spills_or_serialized_wgmma(stages, pingpong, pv_int8,
                                                                      lazy, multicast,
                                                                      static_max, v_direct):
    cubin, log = _compile(stages, pingpong=pingpong, pv_int8=pv_int8, lazy_max=lazy, q_regs=lazy,
                          multicast=multicast, static_max=static_max, v_direct=v_direct)
    assert cubin[:4] == b"\x7fELF"
    assert "0 bytes spill stores, 0 bytes spill loads" in log, log
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    # 384 threads, one CTA per SM: 65,536 / 384 rounded down to a multiple of 8; setmaxnreg
    # then moves registers from the producer warpgroup (24) to the consumers (240; the lazy
    # maximum with the queries in registers uses up to 238 there)
    assert registers <= 168, log
    # ptxas's C7510-C7515 advisories are the ones that say it serialized wgmma instructions
    assert not re.search(r"C751\d", log), log
    assert source.shared_bytes(stages, pv_int8, v_direct) <= 227 * 1024


def test_a_compile_error_names_the_program_and_the_reason():
    pytest.importorskip("torch")
    try:
        cuda_runtime.nvrtc()
    except cuda_runtime.CudaRuntimeError as exc:
        pytest.skip(f"no NVRTC here: {exc}")
    with pytest.raises(cuda_runtime.CudaRuntimeError, match=r"broken\.cu.*sm_90a(.|\n)*undefined"):
        cuda_runtime.compile_cubin("__global__ void k() { undefined_thing(); }", "broken.cu")


def test_diagnostic_variants_are_separate_programs():
    """bench/attention.py --diagnose times variants with parts removed; they must never be the
    default's source."""
    shipped = source.source(2)
    assert "#define DIAG 0" in shipped
    assert source.source(2, 1) != shipped and "#define DIAG 1" in source.source(2, 1)


def test_lazy_maximum_and_register_queries_need_the_preset_scores():
    """Both start the scores from preload_scores' value; turning that off alone is refused,
    the eighth session's kernel (all three off) still builds."""
    with pytest.raises(ValueError, match="preload"):
        source.source(3, preload=False)
    text = source.source(3, preload=False, lazy_max=False, q_regs=False)
    assert "#define LAZY_MAX 0" in text and "#define Q_REGS 0" in text
    assert "#define LAZY_MAX 1" in source.source(3) and "#define Q_REGS 1" in source.source(3)


def test_paired_ctas_are_a_compile_time_cluster_with_multicast_loads():
    """The pair is declared in the kernel (__cluster_dims__, so a plain cuLaunchKernel forms
    it), loads half tiles with multicast and releases slots on both CTAs; the unpaired kernel
    has none of it."""
    paired, single = source.source(3, multicast=True), source.source(3)
    assert "#define MULTICAST 1" in paired and "#define MULTICAST 0" in single
    for text in ("__cluster_dims__(2, 1, 1)", ".multicast::cluster", "mapa.shared::cluster"):
        assert text in paired   # compiled in only under #if MULTICAST
    assert source.source(3, pv_int8=True, multicast=True) == source.source(3, pv_int8=True)


def test_the_static_maximum_is_a_compile_time_switch_that_needs_the_key_bounds():
    """The default builds the loop without per-block tests next to the lazy one (chosen per
    warpgroup at run time); a launch asking for it without quantize_kv's key bounds is refused
    before anything runs."""
    import torch

    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda

    assert "#define STATIC_MAX 1" in source.source(3)
    assert "#define STATIC_MAX 0" in source.source(3, static_max=False)
    # it relies on the lazy loop as its fallback and on the ones columns for the row sums
    assert "#define STATIC_MAX 0" in source.source(3, lazy_max=False, q_regs=False)
    assert "#define STATIC_MAX 0" in source.source(3, rowsum_mma=False)
    q = torch.zeros(1, 100, 2, 128, dtype=torch.bfloat16)
    k_int = torch.zeros(2, 128, 128, dtype=torch.int8)
    v_t = torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    k_scale = torch.ones(2, 1)
    for bound in (None, torch.ones(3), torch.ones(2, dtype=torch.float64),
                  torch.ones(2, device="meta")):
        with pytest.raises(ValueError, match="static_max needs the key bounds"):
            attention_int8_cuda.attention(q, k_int, k_scale, v_t, torch.empty_like(q), 100, 0.1,
                                          k_bound=bound, static_max=True)


def _sass(tmp_path, **options) -> tuple[list, list]:
    """The instructions of source.source(3, **options) as disassembled by the cuobjdump that
    ships inside Triton's wheel (skip without), and the indices of the warpgroups' turn
    barriers among them."""
    import os
    import subprocess

    triton = pytest.importorskip("triton")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("no cuobjdump in this Triton wheel")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(_compile(3, ptxas_report=False, **options)[0])
    text = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    lines = [line for line in text.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    turns = [i for i, line in enumerate(lines) if "BAR.SYNC" in line and "0x100" in line]
    return lines, turns


def test_v_direct_reads_v_by_4d_tma_with_transposed_products(tmp_path):
    """`v_direct`: V's tiles come by 4-D TMA (channels, heads, keys, batch) and every P.V wgmma
    reads them MN-major (tnspB); the V^T kernel has neither, and the ones atoms make the
    direct kernel's ring larger (still within the 227 KB a CTA may have)."""
    def opcodes(lines):
        return [re.search(r"(UTMALDG\.\dD|HGMMA\.\S+ \S+ \S+ \S+)", line).group(1)
                for line in lines if re.search(r"UTMALDG|HGMMA\.64x136", line)]

    direct, plain = opcodes(_sass(tmp_path, v_direct=True)[0]), opcodes(_sass(tmp_path)[0])
    assert "UTMALDG.4D" in direct and "UTMALDG.4D" not in plain
    pv_direct = [op for op in direct if op.startswith("HGMMA")]
    pv_plain = [op for op in plain if op.startswith("HGMMA")]
    assert pv_direct and all(".tnspB" in op for op in pv_direct)
    assert len(pv_direct) == len(pv_plain) and not any(".tnspB" in op for op in pv_plain)
    assert source.shared_bytes(3) < source.shared_bytes(3, v_direct=True) <= 227 * 1024


def test_preset_from_shared_memory_sits_before_the_turn_barrier(tmp_path):
    """`preset_lds`: the score preset is 16 LDS.128 of distinct addresses issued before a
    warpgroup's turn barrier, and no register move of 1.5 * 2^23 is left between that barrier
    and the Q.K^T (the default's 64 moves sit there: docs/ATTENTION_8BIT.md, eleventh session).
    Fails if ptxas merges the loads again or sinks the preset past the barrier."""
    default, _ = _sass(tmp_path, preset_lds=False, pingpong=True)
    lines, turns = _sass(tmp_path, preset_lds=True, pingpong=True)
    assert "\n".join(default).count("0x4b400000") >= 64
    assert turns
    for turn in turns:   # the block's turn barrier: 16 loads before it, no preset move after it
        before = lines[max(0, turn - 60):turn]
        after = []
        for line in lines[turn + 1:]:
            if "IGMMA" in line:
                break
            after.append(line)
        loads = {line.split("[")[1].split("]")[0] for line in before if "LDS.128" in line}
        assert len(loads) == 16, before
        assert not any("0x4b400000" in line for line in after), after


@pytest.mark.parametrize("static_max", [True, False])
def test_products_are_issued_from_uniform_registers(static_max, tmp_path):
    """Between a warpgroup's turn barrier and the wait for its Q.K^T, the loop moves nothing
    from per-thread to uniform registers (R2UR): with the loop chosen by a per-thread value
    ptxas did so before every wgmma, and the static loop ran ~10% slower (the warp vote that
    makes the choice uniform, attention_int8_cuda_loop)."""
    lines, turns = _sass(tmp_path, static_max=static_max, pingpong=True)
    assert turns
    for turn in turns:
        for line in lines[turn + 1:]:
            assert "R2UR" not in line, line
            if "WARPGROUP.DEPBAR.LE" in line:
                break


def test_launcher_checks_v_before_anything_runs():
    """V itself (4-D) must be bf16 [B, keys, H, 128] with TMA-readable pointer and strides, V^T
    (3-D) [B*H, 128, padded]: otherwise a ValueError naming what was expected, before any tensor
    map or compilation (no GPU needed). reads_v says whether quantize_kv may skip the V^T copy."""
    import torch

    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    q = torch.zeros(1, 100, 2, 128, dtype=torch.bfloat16)
    k_int, k_scale = torch.zeros(2, 128, 128, dtype=torch.int8), torch.ones(2, 1)
    bound = torch.ones(2)
    odd = torch.zeros(1 * 100 * 2 * 128 + 4, dtype=torch.bfloat16)[4:].view(1, 100, 2, 128)
    for v, message in ((torch.zeros(1, 99, 2, 128, dtype=torch.bfloat16), "V must be"),
                       (torch.zeros(1, 100, 2, 128, dtype=torch.float16), "V must be"),
                       (odd, "V must be"),
                       (torch.zeros(2, 128, 100, dtype=torch.bfloat16), "V\\^T must be")):
        with pytest.raises(ValueError, match=message):
            ac.attention(q, k_int, k_scale, v, torch.empty_like(q), 100, 0.1, k_bound=bound)
    saved, ac.V_DIRECT = ac.V_DIRECT, True
    try:
        assert ac.reads_v(torch.zeros(1, 100, 2, 128, dtype=torch.bfloat16))
        assert ac.reads_v(torch.zeros(1, 100, 3, 2, 128, dtype=torch.bfloat16)[:, :, 2])
        assert not ac.reads_v(odd)
        assert not ac.reads_v(torch.zeros(1, 100, 2, 128, dtype=torch.float16))
    finally:
        ac.V_DIRECT = saved
    assert not ac.reads_v(torch.zeros(1, 100, 2, 128, dtype=torch.bfloat16))   # off by default
