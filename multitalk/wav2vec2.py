"""wav2vec 2.0 encoder in plain PyTorch (the network InfiniteTalk reads speech with).

Written out here instead of subclassing transformers: transformers 5.x changed how encoder hidden
states are collected, and InfiniteTalk needs to resample the conv features *between* the feature
extractor and the transformer. Parameter names follow the transformers checkpoint layout, so
`config.json` + `model.safetensors` / `pytorch_model.bin` folders load directly, and a bare
safetensors file loads with a config inferred from its shapes (defaults: chinese-wav2vec2-base).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..wanvideo import placement


@dataclass(frozen=True)
class Wav2Vec2Config:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    hidden_act: str = "gelu"
    feat_extract_activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False

    @classmethod
    def from_dict(cls, d: Mapping) -> "Wav2Vec2Config":
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    @property
    def hop(self) -> int:
        out = 1
        for s in self.conv_stride:
            out *= s
        return out


CHINESE_WAV2VEC2_BASE = Wav2Vec2Config()  # hidden 768, 12 layers, conv stride 320

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
         "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _act(name: str):
    if name not in _ACTS:
        raise ValueError(f"wav2vec2 activation {name!r} is not supported ({sorted(_ACTS)})")
    return _ACTS[name]


class _ConvLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, i: int, norm: str | None):
        super().__init__()
        cin = cfg.conv_dim[i - 1] if i else 1
        cout = cfg.conv_dim[i]
        self.conv = nn.Conv1d(cin, cout, cfg.conv_kernel[i], stride=cfg.conv_stride[i], bias=cfg.conv_bias)
        self.norm_kind = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(cout, cout, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(cout)
        self.act = _act(cfg.feat_extract_activation)

    def forward(self, x):
        x = self.conv(x)
        if self.norm_kind == "group":
            x = self.layer_norm(x)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class _FeatureExtractor(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        if cfg.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm {cfg.feat_extract_norm!r} must be 'group' or 'layer'")
        norms = ["group" if i == 0 else None for i in range(len(cfg.conv_dim))] \
            if cfg.feat_extract_norm == "group" else ["layer"] * len(cfg.conv_dim)
        self.conv_layers = nn.ModuleList(_ConvLayer(cfg, i, n) for i, n in enumerate(norms))


class _FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)


class _Attention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(placement.attention_ready(q), placement.attention_ready(k),
                                             placement.attention_ready(v))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class _FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.output_dense(self.act(self.intermediate_dense(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.stable = cfg.do_stable_layer_norm
        self.attention = _Attention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = _FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        if self.stable:  # pre-norm (large models)
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class _PositionalConv(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        # Weight norm is folded into `weight` at load time (see fold_weight_norm).
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                              groups=cfg.num_conv_pos_embedding_groups)
        self.trim = 1 if k % 2 == 0 else 0
        self.act = _act(cfg.feat_extract_activation)

    def forward(self, x):
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[..., :-self.trim]
        return self.act(y).transpose(1, 2)


class _Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = _PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class Wav2Vec2Encoder(nn.Module):
    """conv features -> (resample to the video rate, done by the caller) -> per-layer outputs."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.config = cfg
        self.feature_extractor = _FeatureExtractor(cfg)
        self.feature_projection = _FeatureProjection(cfg)
        self.encoder = _Encoder(cfg)

    def conv_features(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, N] (normalised 16 kHz) -> conv features [B, T_conv, conv_dim]."""
        x = wave[:, None]
        for layer in self.feature_extractor.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)

    def layer_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """conv features [B, T, conv_dim] -> outputs of encoder layers 1..N stacked [B, T, N, hidden]
        (transformers' hidden_states[1:]; for the pre-norm variant the last one is layer-normed)."""
        proj = self.feature_projection
        x = proj.projection(proj.layer_norm(features))
        enc = self.encoder
        x = x + enc.pos_conv_embed(x)
        if not self.config.do_stable_layer_norm:
            x = enc.layer_norm(x)
        outs = []
        for layer in enc.layers:
            x = layer(x)
            outs.append(x)
        if self.config.do_stable_layer_norm:
            outs[-1] = enc.layer_norm(x)
        return torch.stack(outs, dim=2)


# ---- loading ---------------------------------------------------------------------------------

_POS = "encoder.pos_conv_embed.conv."
_WN_STYLES = (("weight_g", "weight_v"),
              ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def normalize_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `wav2vec2.` prefix of task heads and fold the positional conv's weight norm
    (old `weight_g/weight_v` or new `parametrizations.weight.original0/1`) into one weight."""
    out = {}
    for k, v in sd.items():
        out[k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k] = v
    for g_name, v_name in _WN_STYLES:
        g, v = out.pop(_POS + g_name, None), out.pop(_POS + v_name, None)
        if g is not None and v is not None:
            out[_POS + "weight"] = torch._weight_norm(v.float(), g.float(), 2)
    return out


def infer_config(sd: Mapping[str, torch.Tensor], base: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE,
                 where: str = "wav2vec2 weights") -> Wav2Vec2Config:
    """Shapes decide the sizes; what shapes cannot tell (strides, activations, norm placement)
    comes from `base` (chinese-wav2vec2-base). Heads: base's when the width matches, else
    width / 64 (the wav2vec2 convention)."""
    try:
        hidden = sd["feature_projection.projection.weight"].shape[0]
        pos = sd[_POS + "weight"].shape
    except KeyError as exc:
        raise ValueError(f"{where}: not a wav2vec2 model (missing {exc.args[0]!r})") from None
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    n_conv = len({k.split(".")[2] for k in sd if k.startswith("feature_extractor.conv_layers.")})
    conv_dim = tuple(sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[0] for i in range(n_conv))
    kernel = tuple(sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[2] for i in range(n_conv))
    stride = base.conv_stride if len(base.conv_stride) == n_conv else (5,) + (2,) * (n_conv - 1)
    norm = "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in sd else "group"
    return replace(base, hidden_size=hidden, num_hidden_layers=layers,
                   num_attention_heads=(base.num_attention_heads if hidden == base.hidden_size
                                        else max(1, hidden // 64)),
                   intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
                   conv_dim=conv_dim, conv_kernel=kernel, conv_stride=stride,
                   conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd, feat_extract_norm=norm,
                   num_conv_pos_embeddings=pos[2], num_conv_pos_embedding_groups=hidden // pos[1])


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_wav2vec2(path: str, device="cpu", dtype: torch.dtype = torch.float32,
                  base_config: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE) -> Wav2Vec2Encoder:
    """`path`: a folder with config.json and model.safetensors / pytorch_model.bin, or one
    .safetensors file (config inferred from shapes, the rest from `base_config`)."""
    cfg = None
    if os.path.isdir(path):
        weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")
                   if os.path.isfile(os.path.join(path, n))]
        if not weights:
            raise FileNotFoundError(f"{path}: wav2vec2 folder has no model.safetensors or pytorch_model.bin")
        conf = os.path.join(path, "config.json")
        if os.path.isfile(conf):
            with open(conf) as f:
                cfg = Wav2Vec2Config.from_dict(json.load(f))
        file = weights[0]
    elif os.path.isfile(path):
        file = path
    else:
        raise FileNotFoundError(f"{path}: no such wav2vec2 file or folder")
    where = os.path.basename(file)
    sd = normalize_keys(_read_weights(file))
    if cfg is None:
        cfg = infer_config(sd, base_config, where=where)
    with torch.device("meta"):
        model = Wav2Vec2Encoder(cfg)
    wanted = set(model.state_dict().keys())
    missing = sorted(wanted - set(sd))
    if missing:
        raise ValueError(f"{where}: wav2vec2 weights lack {len(missing)} key(s), e.g. {missing[:3]}")
    placement.materialize(model, {k: sd[k] for k in wanted}, torch.device(device),
                          dtype_for=lambda n, t: dtype if t.is_floating_point() else None, where=where)
    return model.eval().requires_grad_(False)
