"""Wan2.1 diffusion transformer (T2V and I2V), in the original key layout.

Precision: weights are stored in the base dtype; modulation, time embedding, head and the residual
stream run in fp32 (as the official code does under autocast), every linear of a block reads its
input in `compute_dtype`. InfiniteTalk fills the `norm_x` / `audio_cross_attn` / `audio_proj` slots.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops, placement
from .quant_linear import (ffn_forward, ffn_rows_input, fp8_rows_input, fp8_scale_slot,
                           shared_input_quantization)
from .attention import attention, sdpa_for
from .config import WanConfig
from .rope import angle_table, apply_rope, cos_sin, grid_angles, rotations
from .sequence_parallel import same_on_every_rank, sharded_forward, split_rotations


def linear_fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a linear layer in fp32 whatever its storage (quantized layers expose `dequantize`)."""
    weight = layer.dequantize() if hasattr(layer, "dequantize") else layer.weight
    bias = getattr(layer, "bias", None)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.enabled(x):
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returning the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = out_dtype or x.dtype
        if fused_ops.enabled(x):  # one pass, written in out_dtype
            return fused_ops.layer_norm(x, self.weight, self.bias, self.eps, out_dtype)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(out_dtype)

    def modulate(self, x, shift, scale, out_dtype: torch.dtype) -> torch.Tensor:
        """norm(x) * (1 + scale) + shift in out_dtype (x fp32 [B, L, C], shift/scale [B, 1, C])."""
        if self.weight is None and fused_ops.enabled(x):
            return fused_ops.modulated_layer_norm(x, shift, scale, out_dtype, self.eps)
        # addcmul keeps the modulation one fused pass over the activations
        return torch.addcmul(shift, self(x), 1 + scale).to(out_dtype)


class _Attention(nn.Module):
    """q, k, v, o projections with RMS-normed q and k: what self- and cross-attention share."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.backend = "sdpa"
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class SelfAttention(_Attention):

    def forward(self, x, rope, return_qk: bool = False, x_scale=None, shard=None):
        """`x_scale`: x's fp8 scale when the kernel that wrote x folded it (fp8_scale_slot),
        or x's per-row scales [rows, 1] when that kernel wrote x itself as fp8 (fp8_rows_input).
        `shard`: a sequence_parallel.TokenShard when x holds only this rank's tokens."""
        b, seq, _ = x.shape
        shape = (b, seq, self.num_heads, -1)
        # fp8 scaled_mm q, k, v: quantize their common input once (None otherwise)
        xq = shared_input_quantization((self.q, self.k, self.v), x, x_scale)
        kw = {} if xq is None else {"quantized": xq}
        # Ulysses (sequence parallel, head exchange): q, k and v leave as each is computed
        heads = None
        if shard is not None and not shard.sp.by_keys(sdpa_for(self.backend, x.device,
                                                               shard.length)):
            heads = shard.heads((b, seq, self.num_heads, x.shape[-1] // self.num_heads))
        send = heads.put if heads is not None else (lambda t: None)
        if fused_ops.enabled(x):  # RMSNorm + RoPE in one pass each
            cos, sin = cos_sin(rope)
            q = self._norm_rope(self.q(x, **kw), self.norm_q, cos, sin, heads, keep=return_qk)
            k = self._norm_rope(self.k(x, **kw), self.norm_k, cos, sin, heads, keep=False)
        else:
            q = apply_rope(self.norm_q(self.q(x, **kw)).view(shape), rope)
            send(q)
            k = apply_rope(self.norm_k(self.k(x, **kw)).view(shape), rope)
            send(k)
        v = self.v(x, **kw).view(shape)
        send(v)
        if heads is not None:
            out, first_keys = heads.attend(lambda q_, k_, v_: attention(q_, k_, v_, self.backend),
                                           return_qk)
        elif shard is not None:
            out, first_keys = shard.attention_by_keys(q, k, v, return_qk)
        else:
            out = self.o(attention(q, k, v, self.backend).flatten(2))
            return out, ((q, k) if return_qk else None)
        # Sharded: all tokens, some heads, against the real tokens only, and back. For the audio
        # attention map: the local q and the first latent frame's keys with all heads (the map
        # reads nothing else, multitalk.audio_attention.affinity_map).
        out = self.o(out.flatten(2))
        return out, ((q, first_keys) if return_qk else None)

    def _norm_rope(self, t, norm, cos, sin, heads, keep: bool):
        """RMSNorm + RoPE of q or k [B, L, dim] in one pass -> [B, L, H, D]; under the head
        exchange handed to it, written straight into its buffers unless `keep` (the caller
        needs the local result) and then None."""
        shape = (*t.shape[:2], self.num_heads, t.shape[-1] // self.num_heads)
        if heads is not None and not keep:
            heads.put_written(lambda send, own, me, slot: fused_ops.rms_norm_rope(
                t, norm.weight, norm.eps, cos, sin, self.num_heads,
                exchange=(send, own, me, slot)), t, shape)
            return None
        y = fused_ops.rms_norm_rope(t, norm.weight, norm.eps, cos, sin, self.num_heads)
        if heads is not None:
            heads.put(y.view(shape))
        return y.view(shape)


class CrossAttention(_Attention):
    """Text cross-attention; I2V adds a second attention over the 257 CLIP tokens."""

    def __init__(self, dim: int, num_heads: int, eps: float, with_image: bool):
        super().__init__(dim, num_heads, eps)
        self.with_image = with_image
        if with_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def forward(self, x, context, image_tokens: int, x_scale=None):
        """`x_scale`: as SelfAttention.forward's, for q."""
        b = x.shape[0]
        heads = (b, -1, self.num_heads, x.shape[-1] // self.num_heads)
        text = context[:, image_tokens:]
        kw = {} if x_scale is None else {"quantized": self.q.quantize_input(x, x_scale)}
        q = self.norm_q(self.q(x, **kw)).view(heads)
        with same_on_every_rank():   # the context is whole on every rank of a split forward
            k = self.norm_k(self.k(text)).view(heads)
            v = self.v(text).view(heads)
        out = attention(q, k, v, self.backend)
        if self.with_image:
            img = context[:, :image_tokens]
            with same_on_every_rank():
                k_img = self.norm_k_img(self.k_img(img)).view(heads)
                v_img = self.v_img(img).view(heads)
            out = out + attention(q, k_img, v_img, self.backend)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.has_image_embedding)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        # InfiniteTalk slots, filled by multitalk.inject.
        self.register_module("norm_x", None)
        self.register_module("audio_cross_attn", None)

    def forward(self, x, e, grid, rope, context, image_tokens, dtype, audio_ctx=None, shard=None):
        """x: fp32 residual [B, L, C]; e: fp32 [B, 6, C]; returns the new fp32 residual.
        With `shard` (sequence parallel) x and rope hold this rank's tokens only."""
        shift0, scale0, gate0, shift1, scale1, gate1 = (self.modulation.float() + e).chunk(6, dim=1)
        need_qk = audio_ctx is not None and getattr(audio_ctx, "needs_attention_map", False)
        if not fused_ops.enabled(x):  # torch reference (CPU, WANVIDEO_FUSED=0)
            y, qk = self.self_attn(self.norm1.modulate(x, shift0, scale0, dtype), rope, need_qk,
                                   shard=shard)
            # addcmul keeps each gated residual one fused pass over the activations
            x = torch.addcmul(x, y, gate0)
            x = x.add_(self.cross_attn(self.norm3(x, dtype), context, image_tokens))
            if audio_ctx is not None and self.audio_cross_attn is not None:
                x = x.add_(self.audio_cross_attn(self.norm_x(x, dtype), audio_ctx, grid, qk=qk,
                                                 **_sharded(shard)))
            y = ffn_forward(self.ffn, self.norm2.modulate(x, shift1, scale1, dtype))
            return x.addcmul_(y, gate1)
        # The same steps through fused_ops: each residual update also writes the next norm's input
        # in one pass; the first writes a new x (the caller's stays untouched, as with addcmul).
        # A norm feeding fp8 scaled_mm layers also folds its output's fp8 scale (s) in that pass.
        # The norms feeding q/k/v and cross-attention q write fp8 with per-row scales for them
        # (rows: h is then (fp8, scales)).
        sa, ca, n3, n2 = self.self_attn, self.cross_attn, self.norm3, self.norm2
        rows = fp8_rows_input((sa.q, sa.k, sa.v), x)
        s = None if rows else fp8_scale_slot((sa.q, sa.k, sa.v), x)
        h = fused_ops.modulated_layer_norm(x, shift0, scale0, dtype, self.norm1.eps, amax_to=s,
                                           fp8_rows=rows)
        h, s = h if rows else (h, s)
        y, qk = sa(h, rope, need_qk, x_scale=s, shard=shard)
        rows = fp8_rows_input((ca.q,), x)
        s = None if rows else fp8_scale_slot((ca.q,), x)
        x, h = fused_ops.residual_layer_norm(x, y, gate0, dtype, n3.eps, n3.weight, n3.bias,
                                             inplace=False, amax_to=s, fp8_rows=rows)
        h, s = h if rows else (h, s)
        y = ca(h, context, image_tokens, x_scale=s)
        if audio_ctx is not None and self.audio_cross_attn is not None:
            nx = self.norm_x
            _, h = fused_ops.residual_layer_norm(x, y, None, dtype, nx.eps, nx.weight, nx.bias)
            y = self.audio_cross_attn(h, audio_ctx, grid, qk=qk, **_sharded(shard))
        rows = ffn_rows_input(self.ffn, x)
        s = None if rows else fp8_scale_slot((self.ffn[0],), x)
        _, h = fused_ops.residual_layer_norm(x, y, None, dtype, n2.eps, shift=shift1, scale=scale1,
                                             amax_to=s, fp8_rows=rows)
        h, s = h if rows else (h, s)
        return fused_ops.gated_residual_(x, ffn_forward(self.ffn, h, s), gate1)


def _sharded(shard) -> dict:
    # Only a sharded forward passes the keyword, so audio layers written before sequence
    # parallelism keep working in one process.
    return {} if shard is None else {"shard": shard}


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        out = cfg.out_dim * math.prod(cfg.patch_size)
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), nn.LayerNorm(dim))

    def forward(self, clip_fea):
        return self.proj(clip_fea)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(pos, freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_embedding:
            self.img_emb = ImageEmbedding(cfg.clip_dim, dim)
        self.register_module("audio_proj", None)
        self.register_buffer("rope_angles", angle_table(cfg.head_dim), persistent=False)
        self.compute_dtype: torch.dtype | None = None
        self.block_streamer = None
        # sequence_parallel.SequenceParallel, or None for a single-process forward
        self.sequence_parallel = None
        # block_hook(i) before block i, or None. The multi-GPU runtime agrees on an interrupt
        # there, so every rank stops at the same block (one rank stopping alone deadlocks).
        self.block_hook = None
        self.set_attention(attention_backend)

    def set_attention(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend
        self.attention_backend = backend

    def rope_table(self) -> torch.Tensor:
        """The float64 RoPE angle table; rebuilt once if a blanket `model.to(dtype)` cast it."""
        if self.rope_angles.dtype != torch.float64:
            placement.set_tensor(self, "rope_angles", angle_table(self.config.head_dim),
                                 device=self.rope_angles.device)
        return self.rope_angles

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.patch_embedding.weight.dtype

    def embed_time(self, t: torch.Tensor):
        e = linear_fp32(self.time_embedding[2],
                        F.silu(linear_fp32(self.time_embedding[0], sinusoidal_embedding(self.config.freq_dim, t))))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_context(self, context, clip_fea):
        cfg, dtype = self.config, self.dtype
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens; at most {cfg.text_len}")
        pad = cfg.text_len - context.shape[1]
        context = F.pad(context.to(dtype), (0, 0, 0, pad))
        context = self.text_embedding(context)
        if not cfg.has_image_embedding:
            return context, 0
        if clip_fea is None:
            raise ValueError("this is an I2V model: clip_fea (CLIP vision tokens) is required")
        image = self.img_emb(clip_fea.to(dtype))
        return torch.cat([image, context], dim=1), image.shape[1]

    def patchify(self, x, y):
        cfg = self.config
        if cfg.has_image_embedding:
            if y is None:
                raise ValueError("this is an I2V model: y (mask + reference latents) is required")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"model input has {x.shape[1]} channels; expected {cfg.in_dim}")
        tokens = self.patch_embedding(x.to(self.dtype))
        grid = tuple(int(s) for s in tokens.shape[2:])
        # The fp32 residual stream starts row-contiguous: a transposed copy here made the first
        # block's two fused norms each copy it again (strided, ~1.4 ms apiece at 32,760 tokens).
        tokens = tokens.flatten(2).transpose(1, 2)
        residual = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
        return residual.copy_(tokens), grid

    def unpatchify(self, x, grid):
        cfg = self.config
        (f, h, w), (pt, ph, pw) = grid, cfg.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, cfg.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], cfg.out_dim, f * pt, h * ph, w * pw)

    def forward(self, x, t, context, clip_fea=None, y=None, audio=None):
        """x [B,16,F,H,W], t [B] in 0..1000, context [B,L,4096]; see docs/INTERFACES.md.

        A block streamer (BlockSwap) follows the whole forward: begin_forward before the first
        weight is read, before_block/after_block around each block, end_forward(ok) after the
        head, also when an error or an interrupt escapes."""
        streamer, ok = self.block_streamer, False
        if streamer is None:
            return self._forward(x, t, context, clip_fea, y, audio, None)
        streamer.begin_forward(self)
        try:
            out = self._forward(x, t, context, clip_fea, y, audio, streamer)
            ok = True
        finally:
            streamer.end_forward(ok)
        return out

    def _forward(self, x, t, context, clip_fea, y, audio, streamer):
        x, grid = self.patchify(x, y)
        e, e0 = self.embed_time(t.reshape(-1).to(x.device))
        context, image_tokens = self.embed_context(context, clip_fea)
        rope = rotations(grid_angles(self.rope_table(), grid, self.config.head_dim), x.device)
        shard = self._shard(grid)
        if shard is not None:
            x, rope = shard.local(x, 1), split_rotations(shard, rope)
        audio_ctx = None
        if audio is not None:
            if self.audio_proj is None:
                raise ValueError("audio was given but the model has no InfiniteTalk layers")
            audio_ctx = self.audio_proj.make_context(audio, grid)
        with contextlib.nullcontext() if shard is None else sharded_forward(shard):
            out = self._blocks(x, e, e0, grid, rope, context, image_tokens, audio_ctx, shard,
                               streamer)
        if shard is not None:
            out = shard.gather_tokens(out)
        return self.unpatchify(out, grid)

    def _blocks(self, x, e, e0, grid, rope, context, image_tokens, audio_ctx, shard, streamer):
        hook = getattr(self, "block_hook", None)
        for i, block in enumerate(self.blocks):
            if hook is not None:
                hook(i)
            if streamer is not None:
                streamer.before_block(i)
            x = block(x, e0, grid, rope, context, image_tokens, self.dtype, audio_ctx, shard)
            if streamer is not None:
                streamer.after_block(i)
        return self.head(x, e)

    def _shard(self, grid):
        sp = getattr(self, "sequence_parallel", None)
        if sp is None or sp.world == 1:
            return None
        sp.check_heads(self.config.num_heads)
        return sp.shard(grid)
