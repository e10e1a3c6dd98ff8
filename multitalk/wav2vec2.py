"""wav2vec 2.0 encoder in plain PyTorch (the network InfiniteTalk reads speech with).

Written out here instead of subclassing transformers: transformers 5.x changed how encoder hidden
states are collected, and InfiniteTalk needs to resample the conv features *between* the feature
extractor and the transformer. Parameter names follow the transformers checkpoint layout, so
`config.json` + `model.safetensors` / `pytorch_model.bin` folders load directly, and a bare
safetensors file loads with a config inferred from its shapes (defaults: chinese-wav2vec2-base).

Long clips: in one piece, 10 minutes of speech need ~10 GB of activations; `Chunking` bounds that
and gives the same features to float rounding (clips that fit one chunk take the one-piece path).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..wanvideo import placement
from ..wanvideo.checkpoint import all_finite, count_nonfinite, load_tensors


class Wav2Vec2Error(ValueError):
    """A wav2vec2 file, folder or config cannot be used; the message starts with its name."""


_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
         "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")
_CONV_LISTS = ("conv_dim", "conv_kernel", "conv_stride")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


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
    def from_dict(cls, d: Mapping, where: str = "wav2vec2 config") -> "Wav2Vec2Config":
        """Known keys of a transformers config.json (others are ignored), validated."""
        if not isinstance(d, Mapping):
            raise Wav2Vec2Error(f"{where}: expected a JSON object, got {type(d).__name__}")
        kw = {f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
              for f in fields(cls) if f.name in d}
        return cls(**kw).validate(where)

    def validate(self, where: str = "wav2vec2 config") -> "Wav2Vec2Config":
        """Raise Wav2Vec2Error (naming `where`) for values the encoder cannot be built from."""
        def bad(msg):
            raise Wav2Vec2Error(f"{where}: {msg}")
        for name in _SIZES:
            if not _positive_int(getattr(self, name)):
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in _CONV_LISTS:
            v = getattr(self, name)
            if not (isinstance(v, tuple) and v and all(_positive_int(e) for e in v)):
                bad(f"{name} must be a non-empty list of positive integers, got {v!r}")
        if len({len(getattr(self, n)) for n in _CONV_LISTS}) != 1:
            bad("conv_dim, conv_kernel and conv_stride must have the same length, got "
                + ", ".join(str(len(getattr(self, n))) for n in _CONV_LISTS))
        for name in ("num_attention_heads", "num_conv_pos_embedding_groups"):
            if self.hidden_size % getattr(self, name):
                bad(f"hidden_size {self.hidden_size} is not divisible by {name} {getattr(self, name)}")
        for name in ("hidden_act", "feat_extract_activation"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in _ACTS:
                bad(f"{name} {getattr(self, name)!r} is not supported ({sorted(_ACTS)})")
        if self.feat_extract_norm not in ("group", "layer"):
            bad(f"feat_extract_norm {self.feat_extract_norm!r} must be 'group' or 'layer'")
        if not (isinstance(self.conv_bias, bool) and isinstance(self.do_stable_layer_norm, bool)):
            bad(f"conv_bias and do_stable_layer_norm must be true or false, got "
                f"{self.conv_bias!r} and {self.do_stable_layer_norm!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            bad(f"layer_norm_eps must be a positive number, got {eps!r}")
        return self


CHINESE_WAV2VEC2_BASE = Wav2Vec2Config()  # hidden 768, 12 layers, conv stride 320


@dataclass(frozen=True)
class Chunking:
    """How much of a clip the encoder holds at once; every setting gives the same features."""
    conv_frames: int = 1000  # conv output frames (50/s) per chunk: 20 s of audio, ~130 MB in layer 0
    rows: int = 4096  # tokens per block of the feed-forward (3072 wide) and the positional conv
    score_elements: int = 1 << 26  # attention scores of one query block (heads*rows*T): 256 MB fp32
    # Fused SDPA kernels (flash, memory-efficient, cuDNN, CPU flash) stream the keys and never
    # hold the scores: trusted, they take all queries at once (small blocks starve the GPU).
    trust_fused_attention: bool = True

    def query_rows(self, heads: int, tokens: int) -> int:
        return max(1, min(tokens, self.score_elements // max(1, heads * tokens)))


def _fused_sdpa(q, k, v) -> bool:
    """Whether SDPA picks a kernel that never materialises the scores (SDPBackend FLASH_ATTENTION,
    EFFICIENT_ATTENTION or CUDNN_ATTENTION: 1, 2, 3) for these inputs."""
    try:
        return int(torch._fused_sdp_choice(q, k, v)) in (1, 2, 3)
    except (AttributeError, RuntimeError, TypeError):  # private op; unknown means the math backend
        return False


DEFAULT_CHUNKING = Chunking()
ONE_SHOT = Chunking(conv_frames=1 << 62, rows=1 << 62, score_elements=1 << 62)


def _by_rows(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn applied to blocks of `rows` tokens of x [B, T, C]; for per-token functions only."""
    if x.shape[1] <= rows:
        return fn(x)
    out = torch.empty_like(x)
    for i in range(0, x.shape[1], rows):
        out[:, i:i + rows] = fn(x[:, i:i + rows])
    return out


class _ConvLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, i: int, norm: str | None):
        super().__init__()
        cin, cout = (cfg.conv_dim[i - 1] if i else 1), cfg.conv_dim[i]
        self.conv = nn.Conv1d(cin, cout, cfg.conv_kernel[i], stride=cfg.conv_stride[i], bias=cfg.conv_bias)
        self.norm_kind = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(cout, cout, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(cout)
        self.act = _ACTS[cfg.feat_extract_activation]

    def forward(self, x, group_affine=None):
        """`group_affine`: (scale, shift) [B, C, 1] standing in for the GroupNorm when x is only a
        chunk of the clip (the norm's statistics belong to the whole clip)."""
        x = self.conv(x)
        if group_affine is not None:
            x = x.mul_(group_affine[0]).add_(group_affine[1])
        elif self.norm_kind == "group":
            x = self.layer_norm(x)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class _FeatureExtractor(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
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

    def forward(self, x, chunking: Chunking):
        """Blocks of queries against all keys: each query's softmax only needs its own row, so
        blocking is exact and bounds the scores a math-backend SDPA materialises."""
        b, t, c = x.shape
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = placement.attention_ready(k), placement.attention_ready(v)
        query_rows = chunking.query_rows(self.heads, t)
        if query_rows < t and chunking.trust_fused_attention and _fused_sdpa(q, k, v):
            query_rows = t
        if query_rows >= t:
            out = F.scaled_dot_product_attention(placement.attention_ready(q), k, v).transpose(1, 2)
        else:
            out = q.new_empty(shape)
            for i in range(0, t, query_rows):
                block = placement.attention_ready(q[:, :, i:i + query_rows])
                out[:, i:i + query_rows] = F.scaled_dot_product_attention(block, k, v).transpose(1, 2)
        return self.out_proj(out.reshape(b, t, c))


class _FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTS[cfg.hidden_act]

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

    def forward(self, x, chunking: Chunking = ONE_SHOT):
        if self.stable:  # pre-norm (large models)
            x = x + self.attention(self.layer_norm(x), chunking)
            return _by_rows(lambda r: r + self.feed_forward(self.final_layer_norm(r)), x, chunking.rows)
        x = self.layer_norm(x + self.attention(x, chunking))
        return _by_rows(lambda r: self.final_layer_norm(r + self.feed_forward(r)), x, chunking.rows)


class _PositionalConv(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        # Weight norm is folded into `weight` at load time (see normalize_keys).
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                              groups=cfg.num_conv_pos_embedding_groups)
        self.trim = 1 if k % 2 == 0 else 0
        self.act = _ACTS[cfg.feat_extract_activation]

    def forward(self, x, rows: int = 1 << 62):
        if x.shape[1] > rows:
            return self._blocks(x, rows)
        y = self.conv(x.transpose(1, 2))
        return self.act(y[..., :-self.trim] if self.trim else y).transpose(1, 2)

    def _blocks(self, x, rows: int):
        """Output token i reads padded inputs [i, i + k): a block of outputs takes its slice of
        the input, zero-padded only where the whole clip's padding would be."""
        k, pad, t = self.conv.kernel_size[0], self.conv.padding[0], x.shape[1]
        xt = x.transpose(1, 2)
        out = torch.empty_like(x)
        for i in range(0, t, rows):
            j = min(t, i + rows)
            lo, hi = i - pad, j - pad + k - 1
            piece = F.pad(xt[..., max(lo, 0):min(hi, t)], (max(0, -lo), max(0, hi - t)))
            y = F.conv1d(piece, self.conv.weight, self.conv.bias, groups=self.conv.groups)
            out[:, i:j] = self.act(y).transpose(1, 2)
        return out


class _Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = _PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


def _span(kernels, strides, samples: int) -> tuple[int, int, int]:
    """(hop, receptive field, output frames) of an unpadded conv stack over `samples` inputs:
    output frame j reads inputs [j * hop, j * hop + field)."""
    hop, field = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * hop
        hop *= s
    return hop, field, (samples - field) // hop + 1 if samples >= field else 0


class Wav2Vec2Encoder(nn.Module):
    """conv features -> (resample to the video rate, done by the caller) -> per-layer outputs."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.config = cfg.validate()
        self.feature_extractor = _FeatureExtractor(cfg)
        self.feature_projection = _FeatureProjection(cfg)
        self.encoder = _Encoder(cfg)

    def conv_features(self, wave: torch.Tensor, chunking: Chunking = DEFAULT_CHUNKING) -> torch.Tensor:
        """wave [B, N] (normalised 16 kHz) -> conv features [B, T_conv, conv_dim], in chunks of
        `chunking.conv_frames` output frames, each from the wave slice holding its whole receptive
        field (the stack has no padding, so no output sees a chunk edge). Layer 0's GroupNorm
        (each channel over the whole clip) gets its statistics from a first pass."""
        cfg, layers = self.config, self.feature_extractor.conv_layers
        hop, field, total = _span(cfg.conv_kernel, cfg.conv_stride, wave.shape[-1])
        if total <= chunking.conv_frames:
            x = wave[:, None]
            for layer in layers:
                x = layer(x)
            return x.transpose(1, 2)
        affine = self._group_affine(wave, chunking.conv_frames) if layers[0].norm_kind == "group" else None
        out = wave.new_empty(wave.shape[0], total, cfg.conv_dim[-1])
        for a in range(0, total, chunking.conv_frames):
            b = min(total, a + chunking.conv_frames)
            x = wave[:, None, a * hop:(b - 1) * hop + field]
            for i, layer in enumerate(layers):
                x = layer(x, affine if i == 0 else None)
            out[:, a:b] = x.transpose(1, 2)
        return out

    def _group_affine(self, wave: torch.Tensor, conv_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's GroupNorm (one group per channel) as per-clip (scale, shift) [B, C, 1].
        Chunk means and squared deviations (fp32, about the chunk's own mean) are merged in
        float64 (Chan et al.), so no precision is lost to long sums or to a large mean."""
        layer = self.feature_extractor.conv_layers[0]
        k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
        total = _span((k,), (s,), wave.shape[-1])[2]
        step = conv_frames * math.prod(self.config.conv_stride) // s  # layer-0 frames of one output chunk
        count, mean, m2 = 0, 0.0, 0.0
        for a in range(0, total, step):
            b = min(total, a + step)
            var_c, mean_c = torch.var_mean(layer.conv(wave[:, None, a * s:(b - 1) * s + k]), dim=-1,
                                           correction=0)
            n, mean_c, m2_c = b - a, mean_c.double(), var_c.double() * (b - a)
            delta = mean_c - mean
            mean = mean + delta * (n / (count + n))
            m2 = m2 + m2_c + delta * delta * (count * n / (count + n))
            count += n
        norm = layer.layer_norm
        scale = norm.weight.double() / torch.sqrt(m2 / count + norm.eps)
        shift = norm.bias.double() - mean * scale
        return scale.to(wave.dtype)[..., None], shift.to(wave.dtype)[..., None]

    def layer_outputs(self, features: torch.Tensor, chunking: Chunking = DEFAULT_CHUNKING,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """conv features [B, T, conv_dim] -> outputs of encoder layers 1..N stacked [B, T, N, hidden]
        (transformers' hidden_states[1:]; for the pre-norm variant the last one is layer-normed).
        With `out` (any device, e.g. host RAM) each layer's output is copied there as soon as it
        exists, so the compute device never holds all N of them."""
        proj, enc = self.feature_projection, self.encoder
        x = proj.projection(proj.layer_norm(features))
        x = x + enc.pos_conv_embed(x, chunking.rows)
        if not self.config.do_stable_layer_norm:
            x = enc.layer_norm(x)
        outs = []
        for i, layer in enumerate(enc.layers):
            x = layer(x, chunking)
            y = enc.layer_norm(x) if self.config.do_stable_layer_norm and i == len(enc.layers) - 1 else x
            if out is None:
                outs.append(y)
            else:
                out[:, :, i].copy_(y)
        return torch.stack(outs, dim=2) if out is None else out


# ---- loading ---------------------------------------------------------------------------------

_POS = "encoder.pos_conv_embed.conv."
_WN_STYLES = (("weight_g", "weight_v"),
              ("parametrizations.weight.original0", "parametrizations.weight.original1"))
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def normalize_keys(sd: Mapping[str, torch.Tensor], where: str = "wav2vec2 weights") -> dict[str, torch.Tensor]:
    """Strip the `wav2vec2.` prefix of task heads and fold the positional conv's weight norm
    (old `weight_g/weight_v` or new `parametrizations.weight.original0/1`) into one weight."""
    out = {}
    for k, v in sd.items():
        out[k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k] = v
    for g_name, v_name in _WN_STYLES:
        g, v = out.pop(_POS + g_name, None), out.pop(_POS + v_name, None)
        if g is not None and v is not None:
            try:
                out[_POS + "weight"] = torch._weight_norm(v.float(), g.float(), 2)
            except RuntimeError:
                raise Wav2Vec2Error(f"{where}: positional conv {_POS}{g_name} {list(g.shape)} does not "
                                    f"fit {v_name} {list(v.shape)}") from None
    return out


def infer_config(sd: Mapping[str, torch.Tensor], base: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE,
                 where: str = "wav2vec2 weights") -> Wav2Vec2Config:
    """Shapes decide the sizes; what shapes cannot tell (strides, activations, norm placement)
    comes from `base` (chinese-wav2vec2-base). Heads: base's when the width matches, else
    width / 64 (the wav2vec2 convention)."""
    try:
        hidden = sd["feature_projection.projection.weight"].shape[0]
        pos = sd[_POS + "weight"].shape
        layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
        n_conv = len({k.split(".")[2] for k in sd if k.startswith("feature_extractor.conv_layers.")})
        convs = [sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape for i in range(n_conv)]
        stride = base.conv_stride if len(base.conv_stride) == n_conv else (5,) + (2,) * (n_conv - 1)
        cfg = replace(base, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=(base.num_attention_heads if hidden == base.hidden_size
                                           else max(1, hidden // 64)),
                      intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
                      conv_dim=tuple(s[0] for s in convs), conv_kernel=tuple(s[2] for s in convs),
                      conv_stride=stride, conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd,
                      feat_extract_norm=("layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in sd
                                         else "group"),
                      num_conv_pos_embeddings=pos[2], num_conv_pos_embedding_groups=hidden // pos[1])
    except KeyError as exc:
        raise Wav2Vec2Error(f"{where}: not a wav2vec2 model (missing {exc.args[0]!r})") from None
    except (IndexError, ZeroDivisionError):
        raise Wav2Vec2Error(f"{where}: tensor shapes do not describe a wav2vec2 model") from None
    return cfg.validate(where)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch (a function so tests can pretend to be older)."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _read_bin(path: str, where: str) -> dict[str, torch.Tensor]:
    # torch.load(weights_only=True) could still run code from a crafted file before torch 2.6
    # (CVE-2025-32434); safetensors files never go through pickle.
    if torch_version() < (2, 6):
        raise Wav2Vec2Error(f"{where}: .bin weights are only read with torch >= 2.6 (this is torch "
                            f"{torch.__version__}, whose torch.load is not safe on untrusted files); "
                            "convert the file to model.safetensors or upgrade torch")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt pickles raise many types (UnpicklingError, RuntimeError, EOFError)
        raise Wav2Vec2Error(f"{where}: not readable PyTorch weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in sd.items()):
        raise Wav2Vec2Error(f"{where}: expected a dict of named tensors, got {type(sd).__name__}")
    return dict(sd)


def _check_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Every tensor the model needs is present, floating point, of the config's shape, finite."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise Wav2Vec2Error(f"{where}: wav2vec2 weights lack {len(missing)} key(s), e.g. {missing[:3]}")
    for key, like in wanted.items():
        t = sd[key]
        if tuple(t.shape) != tuple(like.shape) or not t.is_floating_point():
            raise Wav2Vec2Error(f"{where}: {key!r} has shape {list(t.shape)} ({t.dtype}) but the "
                                f"config needs {list(like.shape)} (floating point)")
        if not all_finite(t):
            raise Wav2Vec2Error(f"{where}: {key!r} has {count_nonfinite(t)} NaN/Inf "
                                "values; the file is corrupt")


def _read_config(folder: str) -> Wav2Vec2Config | None:
    conf = os.path.join(folder, "config.json")
    if not os.path.isfile(conf):
        return None
    where = os.path.join(os.path.basename(os.path.normpath(folder)), "config.json")
    try:
        with open(conf, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise Wav2Vec2Error(f"{where}: not valid JSON ({exc})") from None
    return Wav2Vec2Config.from_dict(data, where)


def _find_weights(path: str) -> tuple[str, str, Wav2Vec2Config | None]:
    """(weights file, its name for messages, config from config.json or None)."""
    if os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        files = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not files:
            raise FileNotFoundError(f"{name}: wav2vec2 folder has no {' or '.join(_WEIGHT_FILES)} "
                                    f"(it holds {sorted(os.listdir(path))[:8] or 'nothing'})")
        return os.path.join(path, files[0]), os.path.join(name, files[0]), _read_config(path)
    if os.path.isfile(path):
        return path, os.path.basename(path), None
    raise FileNotFoundError(f"{path}: no such wav2vec2 file or folder")


def load_wav2vec2(path: str, device="cpu", dtype: torch.dtype = torch.float32,
                  base_config: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE) -> Wav2Vec2Encoder:
    """`path`: a folder with config.json and model.safetensors / pytorch_model.bin, or one
    .safetensors file (config inferred from shapes, the rest from `base_config`). Problems raise
    ValueError subclasses or FileNotFoundError, the message starting with the file's name."""
    file, where, cfg = _find_weights(path)
    raw = load_tensors(file, os.path.dirname(where) or None) if file.endswith(".safetensors") \
        else _read_bin(file, where)  # load_tensors names the file itself; `where` adds the folder
    sd = normalize_keys(raw, where)
    cfg = infer_config(sd, base_config.validate("base_config"), where=where) if cfg is None else cfg
    with torch.device("meta"):
        model = Wav2Vec2Encoder(cfg)
    _check_weights(model, sd, where)
    placement.materialize(model, {k: sd[k] for k in model.state_dict()}, torch.device(device),
                          dtype_for=lambda n, t: dtype if t.is_floating_point() else None, where=where)
    model.source = os.path.basename(os.path.normpath(path))  # names the model in feature errors
    return model.eval().requires_grad_(False)
