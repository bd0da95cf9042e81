"""Real PyTorch models (random weights) and checkpoint files for the PyTorch-format tests:
small stand-ins with the layer types of the speech models kquant's users ship (SenseVoice,
CosyVoice's LLM, flow and HiFi-GAN parts), a hostile pickle, and a checkpoint that records
CUDA as its tensors' device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn


class TinyLLM(nn.Module):
    """CosyVoice-like text-speech LM: embedding, transformer layer, norm, tied LM head."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as LMs do

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layer(self.embed(tokens))))


class TinyFlow(nn.Module):
    """Flow-matching decoder stand-in: conv + batch norm + GRU + projection."""

    def __init__(self, mels: int = 16, dim: int = 24) -> None:
        super().__init__()
        self.conv = nn.Conv1d(mels, dim, 3, padding=1)
        self.bn = nn.BatchNorm1d(dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.proj = nn.Linear(dim, mels)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(mel))).transpose(1, 2)
        y, _ = self.gru(x)
        return self.proj(y).transpose(1, 2)


class TinyHiFT(nn.Module):
    """HiFi-GAN vocoder stand-in: weight-normed transposed conv upsampler."""

    def __init__(self, mels: int = 16) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.up = wn(nn.ConvTranspose1d(mels, 8, 4, stride=2, padding=1))
        self.post = wn(nn.Conv1d(8, 1, 7, padding=3))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.post(torch.nn.functional.leaky_relu(self.up(mel), 0.1)))


class TinySenseVoice(nn.Module):
    """SenseVoice-like encoder: conv subsampling with batch norm, transformer, CTC head."""

    def __init__(self, feats: int = 20, dim: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.subsample = nn.Sequential(nn.Conv1d(feats, dim, 3, stride=2), nn.BatchNorm1d(dim))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, dropout=0.0), 2
        )
        self.ctc = nn.Linear(dim, vocab)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.subsample(feats).transpose(1, 2)
        return self.ctc(self.encoder(x))


def trained_bn(model: nn.Module, variance: float = 3.0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics, as training would."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, variance)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def save_state_dict(model: nn.Module, path: Path, *, legacy: bool = False) -> Path:
    """``torch.save(model.state_dict())``, in the legacy pickle container when asked."""
    torch.manual_seed(0)
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    return path


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: proof of code execution when it exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A real ``torch.save`` zip whose pickle, loaded unsafely, creates ``marker``."""
    torch.save({"weight": torch.randn(4, 4), "payload": _CreatesFile(marker)}, path)
    return path


def gpu_checkpoint(path: Path) -> Path:
    """A checkpoint whose tensors are recorded on ``cuda:0``, as one saved on a GPU machine.

    Written by a separate Python process that registers a storage location tag (torch's
    ``register_package``, the hook device backends use), so this process keeps stock torch.
    """
    script = textwrap.dedent(
        f"""
        import torch
        torch.serialization.register_package(0, lambda obj: "cuda:0", lambda obj, loc: None)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        torch.save(model.state_dict(), {str(path)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    return path
