"""The models and per-rank batches the integration test workers train on (every rank builds the same model;
each rank draws its own batches, reproducibly, from step, micro-batch and rank)."""
import torch
import torch.nn as nn


class Roles(nn.Module):
    """A parameter of each role of `dsq_plugins.engine.policy.Role`: an embedding (of indices made from the
    input), a LayerNorm, a hidden Linear (weight and bias) and the output head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 20)
        self.ln = nn.LayerNorm(20)
        self.fc = nn.Linear(20, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        idx = (x.abs() * 10).long() % 40
        h = self.ln(self.tok(idx).mean(1) + x)
        return self.head(torch.tanh(self.fc(h)))


def build_model(kind: str) -> nn.Module:
    """`single`: one 50x40 weight (one tensor, comparable with the Simulator); `multi`: a small MLP; `deep`: a
    12-layer MLP of 48 units (24 tensors); `roles`: a parameter of every policy role (`Roles`)."""
    torch.manual_seed(1234)
    if kind == "roles":
        return Roles()
    if kind == "single":
        return nn.Linear(50, 40, bias=False)
    if kind == "deep":          # 24 parameters: many DDP buckets
        layers = [nn.Linear(20, 48), nn.Tanh()]
        for _ in range(10):
            layers += [nn.Linear(48, 48), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(48, 5))
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def batch(step: int, micro: int, rank: int, kind: str, size: int = 32):
    g = torch.Generator().manual_seed(100_000 * step + 100 * micro + rank)
    d_in, d_out = (50, 40) if kind == "single" else (20, 5)
    return torch.randn(size, d_in, generator=g), torch.randn(size, d_out, generator=g)
