"""InfiniteTalk audio cross-attention: each latent frame's visual tokens attend to that frame's
audio tokens only (32 per speaker).

With two speakers a 1-D RoPE on q and k routes each visual token to "its" speaker: speaker-1
audio tokens sit at position 2, speaker-2 at 22; a visual token gets a position from its affinity
to the speaker regions (speaker 1 scaled into [0, 4], speaker 2 into [20, 24], background 12), so
it is rotated close to the speaker it belongs to. The affinity comes from the block's own
self-attention (q of every token against k of the first latent frame) and the speaker masks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..wanvideo import placement
from ..wanvideo.sequence_parallel import same_on_every_rank
from .audio_proj import AUDIO_TOKEN_DIM, TOKENS_PER_SPEAKER, AudioContext

# Position layout of the two-speaker RoPE (class_range 24, class_interval 4 in the official code).
SPEAKER1_RANGE = (0.0, 4.0)
SPEAKER2_RANGE = (20.0, 24.0)
BACKGROUND_POS = 12.0
ROPE_BASE = 10000.0


def rope_1d(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Interleaved 1-D RoPE: channel pairs (2i, 2i+1) rotate by pos * base^(-2i/D).
    x [..., N, H, D], pos [N] or [B, N] (matching x's leading axes); computed in fp32."""
    d = x.shape[-1]
    inv = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(device=x.device, dtype=torch.float32).unsqueeze(-1) * inv   # [..., N, D/2]
    cos, sin = ang.cos().unsqueeze(-2), ang.sin().unsqueeze(-2)              # [..., N, 1, D/2]
    xf = x.float().unflatten(-1, (d // 2, 2))
    even, odd = xf[..., 0], xf[..., 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def affinity_map(q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor,
                 frame_tokens: int) -> torch.Tensor:
    """How strongly each visual token attends to each region of the first latent frame.

    q, k [B, L, H, D] (self-attention after RoPE), masks [R, S] 0/1 over the S = frame_tokens
    tokens of one latent frame. Returns [B, R, L]: mean over heads of
    sum_{s in region} softmax_s(q.k_s / sqrt(D)) / |region|.
    softmax(qk)·mask is attention with the masks as values, so one fused SDPA call computes it in
    O(L*D) memory instead of materialising the [H, L, S] probability matrix.
    """
    b, _, h, d = q.shape
    r = masks.shape[0]
    if r > d:
        raise ValueError(f"{r} mask regions exceed head_dim {d}")
    ref_k = k[:, :frame_tokens]
    vals = q.new_zeros(b, h, frame_tokens, d)
    vals[..., :r] = masks.t().to(q.dtype)
    qh = placement.attention_ready(q.transpose(1, 2))
    kh = placement.attention_ready(ref_k.transpose(1, 2))
    out = F.scaled_dot_product_attention(qh, kh, placement.attention_ready(vals))  # [B, H, L, D]
    per_region = out[..., :r].float().mean(dim=1)                                  # [B, L, R]
    sizes = masks.float().sum(dim=1).clamp_min(1.0).to(per_region.device)
    return (per_region / sizes).transpose(1, 2)


def _bounds(row: torch.Tensor, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row over the clip's real tokens; a sharded row holds only this
    rank's tokens, so the bounds are reduced over the ranks (min and max are exact)."""
    if shard is None:
        return row.amin(dim=-1, keepdim=True), row.amax(dim=-1, keepdim=True)
    real = row[..., :shard.real]
    inf = torch.full_like(row[..., :1], float("inf"))
    mn = real.amin(dim=-1, keepdim=True) if shard.real else inf
    mx = real.amax(dim=-1, keepdim=True) if shard.real else -inf
    return (shard.all_reduce(mn, dist.ReduceOp.MIN),
            shard.all_reduce(mx, dist.ReduceOp.MAX))


def _scale(row: torch.Tensor, lo: float, hi: float, shard=None, eps: float = 1e-8) -> torch.Tensor:
    mn, mx = _bounds(row, shard)
    return (row - mn) / (mx - mn + eps) * (hi - lo) + lo


def visual_positions(amap: torch.Tensor, shard=None) -> torch.Tensor:
    """Affinity map [B, 3, L] (speaker 1, speaker 2, background) -> RoPE positions [B, L].
    Each token takes the scaled value of the region it attends to most; each speaker row is
    min-max normalised over all tokens of the clip into its range; background tokens sit at 12.
    `shard` (sequence parallel): amap covers this rank's tokens; the ranges span the whole clip."""
    spk1 = _scale(amap[:, 0], *SPEAKER1_RANGE, shard)
    spk2 = _scale(amap[:, 1], *SPEAKER2_RANGE, shard)
    back = torch.full_like(spk1, BACKGROUND_POS)
    choice = amap.argmax(dim=1, keepdim=True)                          # [B, 1, L]
    return torch.stack([spk1, spk2, back], dim=1).gather(1, choice).squeeze(1)


def audio_positions(n_speakers: int, tokens_per_speaker: int = TOKENS_PER_SPEAKER) -> torch.Tensor:
    """RoPE positions of one latent frame's audio tokens: centre of each speaker's range."""
    centres = [sum(SPEAKER1_RANGE) / 2, sum(SPEAKER2_RANGE) / 2][:n_speakers]
    return torch.tensor(centres, dtype=torch.float32).repeat_interleave(tokens_per_speaker)


class AudioCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, audio_dim: int = AUDIO_TOKEN_DIM):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, audio_ctx: AudioContext, grid: tuple[int, int, int],
                qk: tuple[torch.Tensor, torch.Tensor] | None = None, shard=None) -> torch.Tensor:
        """`shard` (wanvideo.sequence_parallel.TokenShard): x holds only this rank's contiguous
        chunk of tokens; qk is then (local q, first latent frame's k with all heads)."""
        n_lat, h_tok, w_tok = (int(g) for g in grid)
        b, length, c = x.shape
        s = h_tok * w_tok
        expected = n_lat * s if shard is None else shard.chunk
        if length != expected:
            raise ValueError(f"audio attention: {length} tokens do not match grid {grid}")
        heads, hd = self.num_heads, self.head_dim

        q = self.q_linear(x).view(b, length, heads, hd)
        tokens = audio_ctx.tokens
        if tokens.dim() == 3:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[1] != n_lat:
            raise ValueError(f"audio context has {tokens.shape[1]} latent frames, grid has {n_lat}")
        n_audio = tokens.shape[2]
        with same_on_every_rank():   # every rank projects every frame's audio tokens
            kv = self.kv_linear(tokens.to(x.dtype))
        kv = kv.view(tokens.shape[0], n_lat, n_audio, 2, heads, hd)
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]            # K first, then V
        if audio_ctx.n_speakers == 2:
            if qk is None or audio_ctx.masks is None:
                raise ValueError("two-speaker audio attention needs the self-attention (q, k) "
                                 "and speaker masks")
            # In the activation dtype like the official code; fp32 here could push SDPA onto
            # the math backend, which materialises [H, L, S] probabilities (GBs at 480p).
            q_map, k_map = qk[0].to(x.dtype), qk[1].to(x.dtype)
            pos = visual_positions(affinity_map(q_map, k_map, audio_ctx.masks, s), shard)
            q = rope_1d(q, pos)
            k = rope_1d(k, audio_positions(2, n_audio // 2))
        if shard is not None:
            return self.proj(_per_frame_segments(q, k, v, shard).reshape(b, length, c))
        k = k.expand(b, -1, -1, -1, -1).reshape(b * n_lat, n_audio, heads, hd)
        v = v.expand(b, -1, -1, -1, -1).reshape(b * n_lat, n_audio, heads, hd)
        q = q.view(b * n_lat, s, heads, hd)
        out = F.scaled_dot_product_attention(
            placement.attention_ready(q.transpose(1, 2)),
            placement.attention_ready(k.transpose(1, 2)),
            placement.attention_ready(v.transpose(1, 2)))      # [B*T, H, S, D]
        out = out.transpose(1, 2).reshape(b, length, c)
        return self.proj(out)


def _per_frame_segments(q, k, v, shard) -> torch.Tensor:
    """Audio attention for a chunk that need not start or end on a frame boundary: each run of
    tokens of one latent frame (global index // frame tokens) attends to that frame's audio.
    q [B, chunk, H, D]; k, v [1 or B, frames, n_audio, H, D]. Padding rows stay zero."""
    out = torch.zeros_like(q)
    b = q.shape[0]
    for frame, lo, hi in shard.frame_segments():
        kf, vf = (t[:, frame].expand(b, -1, -1, -1) for t in (k, v))
        out[:, lo:hi] = F.scaled_dot_product_attention(
            placement.attention_ready(q[:, lo:hi].transpose(1, 2)),
            placement.attention_ready(kf.transpose(1, 2)),
            placement.attention_ready(vf.transpose(1, 2))).transpose(1, 2)
    return out
