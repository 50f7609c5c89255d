"""An unmodified script: a compiled deep sigmoid MLP under bf16 autocast, saved at the end."""

import sys

import torch
from torch import nn

torch.manual_seed(0)
layers = []
for _ in range(12):
    layers += [nn.Linear(16, 16), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(16, 1))
compiled = torch.compile(model, backend="eager")  # Dynamo traces the forward (and any hook)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(64, 16), torch.randn(64, 1)
for _ in range(4):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(compiled(x).float(), y)
    loss.backward()
    opt.step()
torch.save(model, sys.argv[1])
