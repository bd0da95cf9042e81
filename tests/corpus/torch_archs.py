"""Standard architectures in miniature, random weights: the layer types of real speech and
language models (attention, LayerNorm, GELU, convolutional front ends, BatchNorm, Resize,
recurrent cells), small enough that every corpus test runs in seconds.

Attention is written out (not ``nn.MultiheadAttention``) so the export is the plain
MatMul/Softmax graph that Hugging Face models export to, with BERT's additive -10000 mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DIM = 32
HEADS = 2


class Attention(nn.Module):
    """Multi-head attention: q from ``x``, k/v from ``kv``; ``bias`` is added to the scores."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        s = kv.shape[1]
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(kv).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(kv).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o(out)


class Block(nn.Module):
    """Transformer layer: self-attention (+ cross-attention), GELU feed-forward; pre-norm
    (Whisper, Wav2Vec2-large) or post-norm (BERT)."""

    def __init__(self, pre_norm: bool, cross: bool = False, dim: int = DIM) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn, self.n1 = Attention(dim), nn.LayerNorm(dim)
        self.cross = Attention(dim) if cross else None
        self.n2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.n3 = nn.LayerNorm(dim)

    def _sub(self, x: torch.Tensor, norm: nn.Module, fn: Callable) -> torch.Tensor:
        return x + fn(norm(x)) if self.pre_norm else norm(x + fn(x))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._sub(x, self.n1, lambda h: self.attn(h, h, bias))
        if self.cross is not None and memory is not None:
            x = self._sub(x, self.n2, lambda h: self.cross(h, memory))
        return self._sub(x, self.n3, self.ff)


class SpeechEncoder(nn.Module):
    """Wav2Vec2/Conformer kind: conv feature extractor (GroupNorm, GELU), positional conv,
    a Conformer convolution module (GLU, depthwise conv, BatchNorm, SiLU), two pre-norm
    transformer layers, CTC logits. audio (1, 800) float -> logits (1, frames, 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.fe = nn.Sequential(
            nn.Conv1d(1, DIM, 10, stride=5), nn.GroupNorm(DIM, DIM), nn.GELU(),
            nn.Conv1d(DIM, DIM, 3, stride=2), nn.GELU(),
        )  # fmt: skip
        self.fe_norm, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, DIM)
        self.pos = nn.Conv1d(DIM, DIM, 5, padding=2, groups=4)
        self.pw1 = nn.Conv1d(DIM, 2 * DIM, 1)
        self.dw = nn.Conv1d(DIM, DIM, 3, padding=1, groups=DIM)
        self.bn, self.pw2 = nn.BatchNorm1d(DIM), nn.Conv1d(DIM, DIM, 1)
        self.layers = nn.ModuleList([Block(pre_norm=True) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 12)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        feats = self.fe(audio.unsqueeze(1))  # (b, dim, frames)
        x = self.proj(self.fe_norm(feats.transpose(1, 2)))
        x = x + F.gelu(self.pos(x.transpose(1, 2))).transpose(1, 2)
        conv = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        x = x + self.pw2(F.silu(self.bn(self.dw(conv)))).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class WhisperTiny(nn.Module):
    """Whisper-style encoder-decoder: conv stem on log-mel, sinusoidal positions, pre-norm
    encoder; token embedding, causal self-attention, cross-attention, logits tied to the
    embedding. mel (1, 16, 20) float, tokens (1, 4) int64 -> logits (1, 4, 50)."""

    def __init__(self, mels: int = 16, vocab: int = 50, frames: int = 10, tokens: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(mels, DIM, 3, padding=1)
        self.c2 = nn.Conv1d(DIM, DIM, 3, stride=2, padding=1)
        pos = torch.arange(frames)[:, None] / 10000 ** (torch.arange(0, DIM, 2) / DIM)
        self.register_buffer("enc_pos", torch.cat([pos.sin(), pos.cos()], 1))
        self.enc, self.enc_norm = Block(pre_norm=True), nn.LayerNorm(DIM)
        self.embed, self.dec_pos = nn.Embedding(vocab, DIM), nn.Parameter(torch.randn(tokens, DIM))
        self.dec, self.dec_norm = Block(pre_norm=True, cross=True), nn.LayerNorm(DIM)
        self.register_buffer("causal", torch.full((tokens, tokens), -1e4).triu(1))

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c2(F.gelu(self.c1(mel)))).transpose(1, 2) + self.enc_pos
        memory = self.enc_norm(self.enc(x))
        y = self.embed(tokens) + self.dec_pos
        y = self.dec_norm(self.dec(y, bias=self.causal, memory=memory))
        return y @ self.embed.weight.T


class BertTiny(nn.Module):
    """BERT-style encoder: word + position + type embeddings, LayerNorm, two post-norm layers
    with the additive -10000 padding mask, tanh pooler. input_ids, attention_mask (1, 8) int64
    -> (hidden (1, 8, 32), pooled (1, 32))."""

    def __init__(self, vocab: int = 64, seq: int = 8) -> None:
        super().__init__()
        self.words, self.positions = nn.Embedding(vocab, DIM), nn.Embedding(seq, DIM)
        self.types, self.norm = nn.Embedding(2, DIM), nn.LayerNorm(DIM)
        self.layers = nn.ModuleList([Block(pre_norm=False) for _ in range(2)])
        self.pooler = nn.Linear(DIM, DIM)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.words(input_ids) + self.positions(pos) + self.types(torch.zeros_like(input_ids))
        x = self.norm(x)
        bias = (1.0 - (attention_mask > 0).float())[:, None, None, :] * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


class UpsampleCNN(nn.Module):
    """Image/spectrogram CNN: input BatchNorm (its statistics set by the caller), conv +
    BatchNorm + ReLU, max-pool, nearest and bilinear upsampling (Resize), 1x1 head.
    image (1, 3, 16, 16) -> (1, 4, 32, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_norm = nn.BatchNorm2d(3)
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(self.in_norm(image)))), 2)
        x = F.interpolate(F.relu(self.b2(self.c2(x))), scale_factor=2, mode="nearest")
        return self.head(self.up(x))


class RecurrentNet(nn.Module):
    """LSTM then bidirectional GRU, linear head. x (1, 10, 16) -> (1, 10, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, DIM, batch_first=True)
        self.gru = nn.GRU(DIM, DIM // 2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(DIM, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0])


class LoudLayerNorm(nn.Module):
    """A LayerNorm fed activations of ~1e3 (exported at opset 14, where LayerNorm becomes
    ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div): the squares reach 1e6, beyond FP16, then
    logits. x (2, 16) -> (2, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x) * 1000.0))
