"""An unmodified script that trains with an optimizer, saves the whole model, then sys.exit(3)."""

import sys

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(64, 8), torch.randn(64, 1)
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
torch.save(model, sys.argv[2] if len(sys.argv) > 2 else "model.pt")
sys.exit(3)
