"""A tiny stand-in with the Wan block's Linear names (used until tests run on WanModel too)."""
import torch
import torch.nn.functional as F
from torch import nn


class _Attn(nn.Module):
    def __init__(self, dim, img=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        if img:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = self.q(x) * torch.sigmoid(self.k(x)) + self.v(x)
        if hasattr(self, "k_img"):
            h = h + self.v_img(x) * torch.tanh(self.k_img(x))
        return self.o(h)


class _Audio(nn.Module):
    def __init__(self, dim, adim):
        super().__init__()
        self.q_linear, self.kv_linear, self.proj = (nn.Linear(dim, dim), nn.Linear(adim, 2 * dim),
                                                    nn.Linear(dim, dim))

    def forward(self, x, audio):
        k, v = self.kv_linear(audio).chunk(2, dim=-1)
        w = torch.softmax(self.q_linear(x) @ k.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.proj(w @ v)


class _Block(nn.Module):
    def __init__(self, dim, ffn, adim):
        super().__init__()
        self.self_attn, self.cross_attn = _Attn(dim), _Attn(dim, img=True)
        self.audio_cross_attn = _Audio(dim, adim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, x, audio):
        x = x + self.self_attn(F.layer_norm(x, x.shape[-1:]))
        x = x + self.cross_attn(F.layer_norm(x, x.shape[-1:]))
        x = x + self.audio_cross_attn(F.layer_norm(x, x.shape[-1:]), audio)
        return x + self.ffn(F.layer_norm(x, x.shape[-1:]))


class TinyWan(nn.Module):
    def __init__(self, dim=64, ffn=128, layers=2, adim=48):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, ffn, adim) for _ in range(layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(dim, 16)

    def forward(self, x, audio):
        for b in self.blocks:
            x = b(x, audio)
        return self.head.head(x)


def tiny_model(dtype=torch.bfloat16, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    m = TinyWan(**kw).to(dtype=dtype)
    return m.to(device).eval()


def tiny_inputs(dtype=torch.bfloat16, device="cpu", seed=1, tokens=24, dim=64, adim=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, dim, generator=g).to(dtype)
    a = torch.randn(1, 8, adim, generator=g).to(dtype)
    return x.to(device), a.to(device)


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
