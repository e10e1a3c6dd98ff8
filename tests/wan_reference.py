"""diffusers' WanTransformer3DModel as an independent reference (test-only dependency)."""
from __future__ import annotations

import torch

from wanvideo_infinitetalk.wanvideo.key_layouts import to_diffusers


def diffusers_model(cfg, state_dict, dtype=torch.float32, device="cpu"):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
        image_dim=cfg.clip_dim if cfg.has_image_embedding else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_embedding else None, rope_max_seq_len=1024)
    converted = {to_diffusers(k): v for k, v in state_dict.items()}
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    return ref.to(device=device, dtype=dtype).eval()


def diffusers_forward(ref, x, t, context, clip_fea=None, y=None, text_len=512):
    hidden = torch.cat([x, y], dim=1) if y is not None else x
    ctx = torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))
    with torch.no_grad():
        return ref(hidden_states=hidden, timestep=t, encoder_hidden_states=ctx,
                   encoder_hidden_states_image=clip_fea, return_dict=False)[0]
