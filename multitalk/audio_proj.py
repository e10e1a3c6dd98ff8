"""InfiniteTalk audio projection: windowed wav2vec features -> 32 audio tokens per latent frame.

Keys (original layout): proj1 [512, 5*12*768], proj1_vf [512, 8*12*768], proj2 [512, 512],
proj3 [32*768, 512], norm LayerNorm(768); all with bias. ReLU after proj1/proj1_vf and proj2;
the output LayerNorm runs in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import audio_windows as aw

WAV2VEC_LAYERS = 12
WAV2VEC_DIM = 768
INTERMEDIATE = 512
TOKENS_PER_SPEAKER = 32
AUDIO_TOKEN_DIM = 768


@dataclass
class AudioInput:
    """Per-clip audio for the transformer.

    features: windowed wav2vec features per speaker [n_spk, n_video_frames, 5, 12, 768]
              (audio_windows.clip_windows per speaker, stacked).
    masks:    speaker masks [n_spk, H, W] at any resolution (1 = that speaker's region); needed for
              two speakers, ignored for one. Resized (nearest) to the token grid per forward.
    """
    features: torch.Tensor
    masks: torch.Tensor | None = None

    def __post_init__(self):
        if self.features.dim() == 4:  # one speaker given without the speaker axis
            self.features = self.features.unsqueeze(0)
        if self.features.dim() != 5 or self.features.shape[2] != aw.WINDOW:
            raise ValueError("AudioInput.features must be [n_speakers, n_video_frames, 5, layers, "
                             f"channels], got {tuple(self.features.shape)}")
        n = self.n_speakers
        if n not in (1, 2):
            raise ValueError(f"InfiniteTalk supports one or two speakers, got {n}")
        if n == 2:
            if self.masks is None:
                raise ValueError("two speakers need speaker masks (see multitalk.speakers)")
            if self.masks.dim() != 3 or self.masks.shape[0] != 2:
                raise ValueError(f"two speakers need 2 masks [2, H, W], got "
                                 f"{tuple(self.masks.shape)}")

    @property
    def n_speakers(self) -> int:
        return int(self.features.shape[0])

    def silent(self) -> "AudioInput":
        """The "no audio" input of the guidance passes: zeros, one speaker."""
        return AudioInput(torch.zeros_like(self.features[-1:]))


@dataclass
class AudioContext:
    """Per-forward audio state shared by all blocks.

    tokens: [n_frames_lat, 32 * n_speakers, 768] (speaker 1's 32 tokens first).
    masks:  for two speakers, [3, H_tok * W_tok] float: speaker 1, speaker 2, background.
    """
    tokens: torch.Tensor
    n_speakers: int
    masks: torch.Tensor | None = None

    @property
    def needs_attention_map(self) -> bool:
        return self.n_speakers == 2


def token_masks(masks: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """Speaker masks [2, H, W] -> [3, h_tok*w_tok] (speaker 1, speaker 2, background) as 0/1 floats.
    Background is where neither speaker is."""
    m = F.interpolate(masks.float().unsqueeze(0), size=(h_tok, w_tok), mode="nearest")[0] > 0
    background = ~(m.any(dim=0, keepdim=True))
    return torch.cat([m, background], dim=0).flatten(1).float()


class AudioProjModel(nn.Module):
    def __init__(self, window: int = aw.WINDOW, window_vf: int = aw.LATER_ENTRIES,
                 layers: int = WAV2VEC_LAYERS, channels: int = WAV2VEC_DIM,
                 intermediate: int = INTERMEDIATE, tokens: int = TOKENS_PER_SPEAKER,
                 out_dim: int = AUDIO_TOKEN_DIM):
        super().__init__()
        self.tokens, self.out_dim = tokens, out_dim
        self.proj1 = nn.Linear(window * layers * channels, intermediate)
        self.proj1_vf = nn.Linear(window_vf * layers * channels, intermediate)
        self.proj2 = nn.Linear(intermediate, intermediate)
        self.proj3 = nn.Linear(intermediate, tokens * out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def compute_dtype(self) -> torch.dtype:
        # Biases stay high precision even when weights are quantized.
        return self.proj2.bias.dtype

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first [n_spk, 5, 12, 768], later [n_spk, F-1, 8, 12, 768] -> [n_spk, F, 32, 768]."""
        dtype = self.compute_dtype()
        n_spk = first.shape[0]
        h0 = F.relu(self.proj1(first.reshape(n_spk, 1, -1).to(dtype)))
        if later.shape[1]:
            h1 = F.relu(self.proj1_vf(later.reshape(n_spk, later.shape[1], -1).to(dtype)))
            h0 = torch.cat([h0, h1], dim=1)
        h = F.relu(self.proj2(h0))
        tok = self.proj3(h).reshape(n_spk, h.shape[1], self.tokens, self.out_dim)
        w = None if self.norm.weight is None else self.norm.weight.float()
        b = None if self.norm.bias is None else self.norm.bias.float()
        tok = F.layer_norm(tok.float(), self.norm.normalized_shape, w, b, self.norm.eps)
        return tok.to(dtype)

    def make_context(self, audio: AudioInput, grid: tuple[int, int, int]) -> AudioContext:
        """Turn one clip's AudioInput into the tokens every block attends to."""
        n_lat, h_tok, w_tok = (int(g) for g in grid)
        device = self.proj2.weight.device
        feats = audio.features.to(device)
        first, later = aw.latent_windows(feats, n_lat)
        tokens = self(first, later)                      # [n_spk, F, 32, 768]
        tokens = tokens.permute(1, 0, 2, 3).reshape(n_lat, -1, self.out_dim).contiguous()
        masks = None
        if audio.n_speakers == 2:
            masks = token_masks(audio.masks, h_tok, w_tok).to(device)
        return AudioContext(tokens=tokens, n_speakers=audio.n_speakers, masks=masks)
