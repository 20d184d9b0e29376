"""The real models and real data of the quality yardstick (`benchmarks/quality.py`, `tests/test_quality.py`).

Nothing is downloaded: the language model reads the Python sources that ship with the interpreter (its standard
library), the digits come bundled with scikit-learn. Every rank builds the same model from the same seed; each
rank draws its own batches, reproducibly, from (seed, step, rank).

- ``lm``: a byte-level transformer language model (2 pre-norm blocks, width 128, 4 heads, context 128, an untied
  output head; 0.5M parameters) on the standard library's ``*.py`` files: every 8th file (sorted by name) is held
  out for validation. Loss: cross-entropy in nats per byte.
- ``digits``: an MLP 64-256-256-10 on scikit-learn's digits (1437 train / 360 test images).
- ``cnn``: a small CNN (two 3x3 convolutions of 32 and 64 channels, a linear head) on the same digits as 8x8 images.
"""
import math
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Task", "TinyLM", "DigitsCNN", "digits_mlp", "python_source_corpus"]


# -- data ------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def python_source_corpus(max_train_bytes: int = 4 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors (uint8) of the interpreter's own standard library sources: the top-level
    ``*.py`` files sorted by name, every 8th one held out; at most `max_train_bytes` of training text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < 40:
        raise RuntimeError(f"expected the standard library's sources in {root}, found {len(files)} .py files")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes()
        if i % 8 == 7:
            val += data
        elif len(train) < max_train_bytes:
            train += data
    return (torch.frombuffer(train[:max_train_bytes], dtype=torch.uint8).clone(),
            torch.frombuffer(val, dtype=torch.uint8).clone())


@lru_cache(maxsize=None)
def digits_data():
    """Standardised digits: (x_train, y_train, x_test, y_test), the split fixed."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    mean, std = x[:n].mean(0), x[:n].std(0) + 0.1
    x = (x - mean) / std
    return x[:n], y[:n], x[n:], y[n:]


# -- models ----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Byte-level GPT-style language model: token and position embeddings, pre-norm blocks, a final norm and an
    untied output head over the 256 byte values."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, context: int = 128):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:     # GPT-2's scaled init of the residual projections
            for m in (blk.proj, blk.out):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.c1(x.view(-1, 1, 8, 8)))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


# -- tasks -----------------------------------------------------------------------------------------------------
class Task:
    """A model, its per-rank batches and its validation loss.

    Args:
        name: ``lm``, ``digits`` or ``cnn``.
        batch: examples per rank per step (LM: sequences of `context` bytes).
        seed: of the model's initialisation and of the batches.
        val_windows: LM only: validation windows of 128 bytes (64, fixed, unless a study needs a finer figure).
    """

    def __init__(self, name: str, batch: int = 0, seed: int = 0, val_windows: int = 64):
        self.name, self.seed, self.val_windows = name, seed, val_windows
        if name == "lm":
            self.batch = batch or 16
            self.train_data, self.val_data = python_source_corpus()
        elif name in ("digits", "cnn"):
            self.batch = batch or 32
            self.xtr, self.ytr, self.xte, self.yte = digits_data()
        else:
            raise ValueError(f"unknown task {name!r}; valid: lm, digits, cnn")

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self.name == "lm":
            return TinyLM()
        return digits_mlp() if self.name == "digits" else DigitsCNN()

    def _windows(self, data: torch.Tensor, starts: torch.Tensor, context: int):
        idx = starts[:, None] + torch.arange(context + 1)
        seq = data[idx].long()
        return seq[:, :-1], seq[:, 1:]

    def batch_for(self, step: int, rank: int):
        g = torch.Generator().manual_seed(1_000_003 * self.seed + 7919 * step + rank)
        if self.name == "lm":
            ctx = 128
            starts = torch.randint(0, len(self.train_data) - ctx - 1, (self.batch,), generator=g)
            return self._windows(self.train_data, starts, ctx)
        i = torch.randint(0, len(self.xtr), (self.batch,), generator=g)
        return self.xtr[i], self.ytr[i]

    @staticmethod
    def loss(model: nn.Module, x, y) -> torch.Tensor:
        out = model(x).float()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """Validation loss (LM: nats per byte over `val_windows` fixed windows; digits: the test set) and, for the
        classifiers, test accuracy."""
        model.eval()
        try:
            if self.name == "lm":
                ctx, n = 128, self.val_windows
                g = torch.Generator().manual_seed(12345)
                starts = torch.randint(0, len(self.val_data) - ctx - 1, (n,), generator=g)
                x, y = self._windows(self.val_data, starts, ctx)
                return {"val_loss": float(self.loss(model, x, y))}
            out = model(self.xte)
            return {"val_loss": float(F.cross_entropy(out, self.yte)),
                    "accuracy": float((out.argmax(1) == self.yte).float().mean())}
        finally:
            model.train()
