"""A labelled diagnosis suite: real tiny models trained ~100 steps on sklearn's digits.

Run:  python benchmarks/diagnosis_suite.py [--only NAME[,NAME...]] [--steps 100] [--details]

Every setup trains under the DEFAULT ``gradmedic.watch(model, opt)`` (no options) in a
plain loop; half of them pass the loss with ``monitor.note_loss(loss)``, half do not.
Each problem setup names the problems that must be found (``expected``, optionally the
root cause that must head the diagnosis); each healthy setup must give no finding.

Printed:
  * the table: setup, expected, named problems (with severity), verdict, first remedy;
  * recall over the problem setups and the false-alarm count over the healthy ones;
  * for each setup, whether ``gradmedic.check()`` at init names the same non-runtime
    problems (vanishing / exploding / dead_units / saturation) as the run;
  * any absurd number in the remedies or the suggested numbers (clip threshold
    > 1e4 or < 1e-6, lr factor < 1e-3 or > 1, or above 100 when raising);
  * for every miss and false alarm, the recorded evidence (depth-gain fits, update
    ratios, unit fractions, time fits, the loss curve) the detectors saw;
  * every warning gradmedic emitted, and any crash.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes), standardized with
one global mean/std; flat (64), image (1x8x8), rows (a sequence of 8 rows of 8) or
pixel pairs (a sequence of 32 steps of 2 pixels) / pixels (64 steps of 1 pixel).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import gradmedic

torch.set_num_threads(2)

NON_RUNTIME = {"vanishing", "exploding", "dead_units", "saturation"}
BATCH = 64

# ----------------------------------------------------------------------------- data

_digits = load_digits()
_X = torch.tensor(_digits.data, dtype=torch.float32)
_X = (_X - _X.mean()) / _X.std()
_Y = torch.tensor(_digits.target, dtype=torch.long)


def view(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "flat":
        return x
    if kind == "image":
        return x.view(-1, 1, 8, 8)
    if kind == "rows":
        return x.view(-1, 8, 8)
    if kind == "pairs":
        return x.view(-1, 32, 2)
    if kind == "pixels":
        return x.view(-1, 64, 1)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- models


def mlp(
    widths: list[int],
    act: Callable[[], nn.Module],
    init: Callable | None = None,
    norm: Callable[[int], nn.Module] | None = None,
    bias: float | None = None,
) -> nn.Sequential:
    mods: list[nn.Module] = []
    n = len(widths) - 1
    for i in range(n):
        lin = nn.Linear(widths[i], widths[i + 1])
        if init is not None:
            init(lin)
        if bias is not None and i < n - 1:
            nn.init.constant_(lin.bias, bias)
        mods.append(lin)
        if i < n - 1:
            if norm is not None:
                mods.append(norm(widths[i + 1]))
            mods.append(act())
    return nn.Sequential(*mods)


def he(lin: nn.Module) -> None:
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


def xavier_tanh(lin: nn.Module) -> None:
    nn.init.xavier_normal_(lin.weight, gain=5 / 3)
    nn.init.zeros_(lin.bias)


def xavier(lin: nn.Module) -> None:
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)


def normal(std: float) -> Callable[[nn.Module], None]:
    def init(lin: nn.Module) -> None:
        nn.init.normal_(lin.weight, 0.0, std)
        nn.init.zeros_(lin.bias)

    return init


def sigma_w(s2: float) -> Callable[[nn.Module], None]:
    """W ~ N(0, s2 / fan_in) (mean-field sigma_w^2 = s2)."""

    def init(lin: nn.Module) -> None:
        nn.init.normal_(lin.weight, 0.0, math.sqrt(s2 / lin.weight.shape[1]))
        nn.init.zeros_(lin.bias)

    return init


def deep(width: int, depth: int, act, init=None, norm=None, inp: int = 64) -> nn.Sequential:
    return mlp([inp] + [width] * (depth - 1) + [10], act, init, norm)


class Scaled(nn.Module):
    """Multiplies the input by a constant before the net (a badly scaled input)."""

    def __init__(self, scale: float, net: nn.Module) -> None:
        super().__init__()
        self.scale, self.net = scale, net

    def forward(self, x):
        return self.net(x * self.scale)


class CNN(nn.Module):
    def __init__(
        self, bn: bool = True, init=None, bias: float | None = None, depth: int = 3, ch: int = 16
    ) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = 1
        for i in range(depth):
            conv = nn.Conv2d(c_in, ch, 3, padding=1)
            if init is not None:
                init(conv)
            if bias is not None:
                nn.init.constant_(conv.bias, bias)
            mods.append(conv)
            if bn:
                mods.append(nn.BatchNorm2d(ch))
            mods.append(nn.ReLU())
            if i == 1:
                mods.append(nn.MaxPool2d(2))
            c_in = ch
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(ch, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block whose last BatchNorm gamma is 0 (Goyal et al. 2017)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        nn.init.zeros_(self.b2.weight)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResCNN(nn.Module):
    def __init__(self, ch: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[BasicBlock(ch) for _ in range(blocks)])
        self.head = nn.Linear(ch, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ZeroResBlock(nn.Module):
    """x + fc2(relu(fc1(x))) with fc2 zero-initialized (the branch starts as 0)."""

    def __init__(self, d: int, norm: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)
        he(self.fc1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class ResMLP(nn.Module):
    def __init__(self, d: int = 64, blocks: int = 6, norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(64, d)
        self.blocks = nn.Sequential(*[ZeroResBlock(d, norm) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.out_norm(self.blocks(self.stem(x))))


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank adapter B @ A with B = 0 (peft style)."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class LoRANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)  # the "pretrained" base
        base = mlp([64, 128, 128], nn.ReLU, he)
        self.l1 = LoRALinear(base[0])
        self.l2 = LoRALinear(base[2])
        self.head = nn.Linear(128, 10)  # a new, trainable head

    def forward(self, x):
        return self.head(F.relu(self.l2(F.relu(self.l1(x)))))


class Transformer(nn.Module):
    """Pre-LN encoder over the 8 rows of the image as 8 tokens."""

    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.ln(self.encoder(self.embed(x) + self.pos)).mean(1))


class RNNNet(nn.Module):
    """A recurrent layer over the sequence, classifying from the last step's output.

    ``every_step``: from the mean of every step's logits instead, so that the loss
    reaches every step directly, as a language model's does.
    """

    def __init__(self, cell: nn.RNNBase, hidden: int, every_step: bool = False) -> None:
        super().__init__()
        self.rnn, self.head, self.every_step = cell, nn.Linear(hidden, 10), every_step

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).mean(1) if self.every_step else self.head(out[:, -1])


def rnn(inp: int, hidden: int, nonlinearity: str, gain: float | None) -> RNNNet:
    cell = nn.RNN(inp, hidden, nonlinearity=nonlinearity, batch_first=True)
    if gain is not None:
        nn.init.orthogonal_(cell.weight_hh_l0, gain=gain)
        nn.init.zeros_(cell.bias_hh_l0)
        nn.init.zeros_(cell.bias_ih_l0)
    return RNNNet(cell, hidden)


def lstm(
    inp: int, hidden: int, forget_bias: float | None = None, every_step: bool = False
) -> RNNNet:
    cell = nn.LSTM(inp, hidden, batch_first=True)
    if forget_bias is not None:
        h = hidden
        with torch.no_grad():
            for b in (cell.bias_ih_l0, cell.bias_hh_l0):
                b[h : 2 * h].fill_(forget_bias / 2)
    return RNNNet(cell, hidden, every_step)


class LogNet(nn.Module):
    """A net whose forward takes log of a signed quantity: NaN from step 0 (no layer's fault)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x)))


# ----------------------------------------------------------------------------- optimizers


def sgd(lr: float, momentum: float = 0.0) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=lr, momentum=momentum
    )


def adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)


def adamw(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )


# ----------------------------------------------------------------------------- setups


@dataclass
class Setup:
    name: str
    build: Callable[[], nn.Module]
    opt: Callable[[nn.Module], torch.optim.Optimizer]
    expected: set[str]  # empty: healthy (nothing may be named)
    data: str = "flat"
    note_loss: bool = False
    root: str | None = None  # the problem that must head the diagnosis
    corrupt_at: int | None = None  # a step whose batch gets a NaN
    clip: float | None = None  # torch.nn.utils.clip_grad_norm_ before each step
    note: str = ""

    @property
    def healthy(self) -> bool:
        return not self.expected


def setups() -> list[Setup]:
    S = Setup
    relu, tanh, sig = nn.ReLU, nn.Tanh, nn.Sigmoid
    out = [
        # ---- vanishing through depth
        S(
            "sigmoid20_sgd",
            lambda: deep(64, 20, sig),
            sgd(0.1),
            {"vanishing"},
            note="20 sigmoid layers, default init",
        ),
        S("sigmoid20_adam", lambda: deep(64, 20, sig), adam(1e-3), {"vanishing"}),
        S(
            "tanh_tiny_init",
            lambda: deep(64, 10, tanh, normal(0.02)),
            sgd(0.05),
            {"vanishing"},
            note="W ~ N(0, 0.02^2): gain 0.16/layer",
        ),
        S(
            "relu20_default_init",
            lambda: deep(64, 20, relu),
            sgd(0.05),
            {"vanishing"},
            note="PyTorch default init: sqrt(1/6)/layer",
        ),
        S("tanh20_default_init", lambda: deep(64, 20, tanh), sgd(0.05), {"vanishing"}),
        # ---- exploding through depth
        S(
            "relu_N01_adam",
            lambda: deep(128, 10, relu, normal(1.0)),
            adam(1e-3),
            {"exploding"},
            note="N(0,1): sqrt(n/2)=8/layer",
        ),
        S(
            "relu_N01_lr1e-12",
            lambda: deep(128, 10, relu, normal(1.0)),
            sgd(1e-12),
            {"exploding"},
            note="explodes at init whatever the lr",
        ),
        S(
            "relu_N01_nan",
            lambda: deep(128, 10, relu, normal(1.0)),
            sgd(0.1),
            {"exploding", "nonfinite"},
            root="exploding",
            note="goes NaN; exploding is the cause",
        ),
        S(
            "relu_N01_cnn",
            lambda: CNN(bn=False, init=normal(1.0), depth=5),
            adam(1e-3),
            {"exploding"},
            data="image",
        ),
        S(
            "chaotic_tanh50",
            lambda: deep(64, 50, tanh, sigma_w(4.0)),
            sgd(0.01),
            {"exploding"},
            note="sigma_w^2=4, depth 50",
        ),
        S(
            "bn_plain_relu50",
            lambda: deep(64, 50, relu, he, nn.BatchNorm1d),
            sgd(0.01),
            {"exploding"},
            note="Yang et al. 2019: BN explodes at init",
        ),
        # ---- dead units
        S(
            "dead_relu_bias-3",
            lambda: mlp([64, 128, 128, 128, 10], relu, he, bias=-3.0),
            sgd(0.05),
            {"dead_units"},
        ),
        S(
            "dead_relu_bias-3_cnn",
            lambda: CNN(bn=False, init=he, bias=-3.0),
            sgd(0.05),
            {"dead_units"},
            data="image",
        ),
        S(
            "dead_relu_huge_lr",
            lambda: mlp([64, 256, 256, 10], relu, he),
            sgd(2.0),
            {"dead_units"},
            note="lr 2 pushes biases negative",
        ),
        # ---- saturation
        S(
            "saturated_sigmoid_x50",
            lambda: Scaled(50.0, mlp([64, 64, 64, 10], sig)),
            sgd(0.1),
            {"saturation"},
        ),
        S(
            "saturated_tanh_x30",
            lambda: Scaled(30.0, mlp([64, 64, 64, 10], tanh, xavier_tanh)),
            sgd(0.05),
            {"saturation"},
        ),
        # ---- step size
        S(
            "diverge_sgd_he_relu",
            lambda: mlp([64, 128, 128, 10], relu, he),
            sgd(1.5),
            {"divergence"},
            note="lr far too large (loss noted)",
        ),
        S(
            "diverge_sgd_he_relu_noloss",
            lambda: mlp([64, 128, 128, 10], relu, he),
            sgd(1.5),
            {"unstable_updates"},
            note="same, no loss passed",
        ),
        S(
            "diverge_sgd_clipped",
            lambda: mlp([64, 128, 128, 10], relu, he),
            sgd(20.0),
            {"divergence"},
            clip=1.0,
            note="lr 20, clipped at 1: each step still 20 long",
        ),
        S(
            "diverge_adam_lr0.1",
            lambda: mlp([64, 128, 128, 10], relu, he),
            adam(0.1),
            {"divergence"},
            note="Adam lr 0.1",
        ),
        S("adam_lr1", lambda: mlp([64, 128, 128, 10], relu, he), adam(1.0), {"unstable_updates"}),
        # ---- non-finite
        S(
            "nan_batch_at_50",
            lambda: mlp([64, 128, 128, 10], relu, he),
            sgd(0.05),
            {"nonfinite"},
            root="nonfinite",
            corrupt_at=50,
            note="one NaN pixel in step 50's batch",
        ),
        S(
            "nan_batch_at_55",
            lambda: mlp([64, 128, 128, 10], relu, he),
            sgd(0.05),
            {"nonfinite"},
            root="nonfinite",
            corrupt_at=55,
            note="same, at a step whose update is not sampled",
        ),
        S(
            "log_of_negative",
            LogNet,
            sgd(0.05),
            {"nonfinite"},
            root="nonfinite",
            note="torch.log in forward",
        ),
        # ---- through time
        S(
            "rnn_tanh_0.5orth_T32",
            lambda: rnn(2, 64, "tanh", 0.5),
            sgd(0.05),
            {"vanishing_in_time"},
            data="pairs",
        ),
        S(
            "rnn_tanh_0.5orth_T64",
            lambda: rnn(1, 32, "tanh", 0.5),
            adam(1e-3),
            {"vanishing_in_time"},
            data="pixels",
        ),
        S(
            "lstm_forget_bias-4_T64",
            lambda: lstm(1, 32, -4.0),
            adam(3e-3),
            {"vanishing_in_time"},
            data="pixels",
        ),
        S(
            "lstm_forget_bias-4_every_step_T64",
            lambda: lstm(1, 32, -4.0, every_step=True),
            adam(3e-3),
            {"vanishing_in_time"},
            data="pixels",
            note="a loss at every step, but the forget gate is shut (0.02)",
        ),
        S(
            "rnn_relu_2orth_T32",
            lambda: rnn(2, 64, "relu", 2.0),
            sgd(1e-4),
            {"exploding_in_time"},
            data="pairs",
        ),
        # ---- healthy twins
        S("he_relu_mlp_sgd", lambda: mlp([64, 128, 128, 10], relu, he), sgd(0.05), set()),
        S("he_relu_mlp_adam", lambda: mlp([64, 128, 128, 10], relu, he), adam(1e-3), set()),
        S("he_relu20_sgd", lambda: deep(64, 20, relu, he), sgd(0.01), set()),
        S("xavier_tanh_mlp", lambda: deep(64, 6, tanh, xavier_tanh), sgd(0.05), set()),
        S("xavier_sigmoid_shallow", lambda: mlp([64, 64, 10], sig, xavier), sgd(0.5), set()),
        S(
            "he_relu50_sgd",
            lambda: deep(64, 50, relu, he),
            sgd(0.01),
            set(),
            note="deep but critical init",
        ),
        S(
            "xavier_tanh50_gain5/3",
            lambda: deep(64, 50, tanh, xavier_tanh),
            sgd(0.01),
            set(),
            note="edge of chaos side: total gain ~1e2",
        ),
        S(
            "adam_1e-2_converged",
            lambda: mlp([64, 128, 128, 10], relu, he),
            adam(1e-2),
            set(),
            note="loss near 0 with noisy batches",
        ),
        S("clipped_sgd_mlp", lambda: mlp([64, 128, 128, 10], relu, he), sgd(0.1), set(), clip=1.0),
        S("leaky_relu_kaiming", lambda: deep(128, 5, nn.LeakyReLU, he), sgd(0.05), set()),
        S(
            "dropout_mlp_momentum",
            lambda: nn.Sequential(
                nn.Linear(64, 256),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(256, 256),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(256, 10),
            ),
            sgd(0.01, 0.9),
            set(),
        ),
        S(
            "gelu_layernorm_adamw",
            lambda: deep(128, 4, nn.GELU, None, nn.LayerNorm),
            adamw(1e-3),
            set(),
        ),
        S("bn_cnn", lambda: CNN(bn=True), sgd(0.05, 0.9), set(), data="image"),
        S("resnet_cnn_zero_gamma", lambda: ResCNN(), sgd(0.05, 0.9), set(), data="image"),
        S("zero_init_residual_mlp", lambda: ResMLP(64, 6), sgd(0.05), set()),
        S("preln_residual12_adam", lambda: ResMLP(64, 12, norm=True), adam(1e-3), set()),
        S("preln_transformer_adamw", Transformer, adamw(1e-3), set(), data="rows"),
        S("lora_adapter_adamw", LoRANet, adamw(1e-3), set()),
        S("lstm_default_rows", lambda: lstm(8, 64), adam(3e-3), set(), data="rows"),
        S(
            "gru_default_rows",
            lambda: RNNNet(nn.GRU(8, 64, batch_first=True), 64),
            adam(3e-3),
            set(),
            data="rows",
        ),
        S(
            "lstm_default_every_step_T64",
            lambda: lstm(1, 32, every_step=True),
            adam(3e-3),
            set(),
            data="pixels",
            note="a loss at every step (like a language model), forget gate at 0.5",
        ),
        S("rnn_tanh_orth_rows", lambda: rnn(8, 64, "tanh", 1.0), sgd(0.05), set(), data="rows"),
    ]
    # note_loss in half of the setups: divergence needs it (that setup's twin goes without);
    # every other one alternates.
    k = 0
    for s in out:
        if s.name in ("diverge_sgd_he_relu", "diverge_sgd_clipped", "diverge_adam_lr0.1"):
            s.note_loss = True
        elif s.name == "diverge_sgd_he_relu_noloss":
            s.note_loss = False
        else:
            s.note_loss = k % 2 == 0
            k += 1
    return out


# ----------------------------------------------------------------------------- running


@dataclass
class Result:
    setup: Setup
    named: dict[str, str] = field(default_factory=dict)  # problem -> severity
    at_init: set[str] = field(default_factory=set)  # named with an episode from the first record
    order: list[str] = field(default_factory=list)
    root: str | None = None
    first_remedy: str = ""
    verdict: str = ""
    check_named: set[str] | None = None
    check_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    absurd: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    diagnosis: Any = None
    seconds: float = 0.0


def run_setup(s: Setup, steps: int) -> Result:
    res = Result(s)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x_all, y_all = view(_X, s.data), _Y
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = s.build()
            opt = s.opt(model)
            first = torch.Generator().manual_seed(7)
            idx0 = torch.randint(0, len(y_all), (BATCH,), generator=first)
            try:
                pre = gradmedic.check(model, x_all[idx0], y_all[idx0], F.cross_entropy)
                res.check_named = {f.problem.value for f in pre.findings}
            except Exception as exc:
                res.check_error = f"{type(exc).__name__}: {exc}"
            with gradmedic.watch(model, opt) as mon:
                for t in range(steps):
                    idx = torch.randint(0, len(y_all), (BATCH,), generator=gen)
                    xb, yb = x_all[idx], y_all[idx]
                    if s.corrupt_at is not None and t == s.corrupt_at:
                        xb = xb.clone()
                        xb.view(BATCH, -1)[0, 0] = float("nan")
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    if s.note_loss:
                        mon.note_loss(loss)
                    loss.backward()
                    if s.clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
                    opt.step()
                    res.losses.append(float(loss.detach()))
            res.rows = mon.history.rows()
            diag = mon.diagnose()
            res.diagnosis = diag
        except Exception:
            res.error = traceback.format_exc(limit=4)
            diag = None
        res.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    res.seconds = time.perf_counter() - t0
    if diag is None:
        res.verdict = "CRASH"
        return res
    for f in diag.findings:
        res.named.setdefault(f.problem.value, f.severity.value)
        res.order.append(f.problem.value)
        first_step = diag.coverage.first_step if diag.coverage is not None else 0
        if f.episode is not None and f.episode.onset == first_step:
            res.at_init.add(f.problem.value)
    res.root = diag.chain[0].problem.value if diag.chain else (res.order[0] if res.order else None)
    if diag.findings and diag.findings[0].remedies:
        r = diag.findings[0].remedies[0]
        res.first_remedy = f"{r.name}: {r.call}"
    res.absurd = absurd_numbers(diag)
    named = set(res.named)
    if s.healthy:
        res.verdict = "ok" if not named else "FALSE ALARM"
    elif not s.expected <= named:
        res.verdict = "MISS"
    elif s.root is not None and res.root != s.root:
        res.verdict = f"MISS(root={res.root})"
    else:
        res.verdict = "hit"
    return res


# ----------------------------------------------------------------------------- absurd numbers

_CLIP_TEXT = re.compile(r"[Cc]lip(?:s|ped)?[^.;]*? at ([0-9.]+(?:e[+-]?[0-9]+)?)")
_CLIP_CALL = re.compile(r"max_norm=([0-9.]+(?:e[+-]?[0-9]+)?)")
_LR_CALL = re.compile(r"\*= ?([0-9.]+(?:e[+-]?[0-9]+)?)")
_LR_TEXT = re.compile(r"[Ll]ower the learning rate ([0-9.]+(?:e[+-]?[0-9]+)?)x")


def _clip_bad(v: float) -> bool:
    return not math.isfinite(v) or v > 1e4 or v < 1e-6


def _factor_bad(v: float, raising: bool = False) -> bool:
    """An lr factor no practitioner would apply: lowering below x1e-3, raising beyond x100."""
    if raising:
        return not math.isfinite(v) or v < 1 or v > 100
    return not math.isfinite(v) or v < 1e-3 or v > 1


def absurd_numbers(diag: Any) -> list[str]:
    out: list[str] = []
    sug = diag.suggested or {}
    c = sug.get("clip_norm")
    if isinstance(c, int | float) and _clip_bad(float(c)):
        out.append(f"suggested.clip_norm={c:g}")
    f = sug.get("lr_factor")
    if isinstance(f, int | float) and _factor_bad(float(f)):
        out.append(f"suggested.lr_factor={f:g}")
    for fi in diag.findings:
        where = fi.problem.value
        for r in fi.remedies:
            p = dict(r.params)
            for key in ("max_norm", "clip_value"):
                if isinstance(p.get(key), int | float) and _clip_bad(float(p[key])):
                    out.append(f"{where}/{r.name}.params.{key}={p[key]:g}")
            raising = r.name == "raise_lr"
            for key in ("factor", "start_factor"):
                if isinstance(p.get(key), int | float) and _factor_bad(float(p[key]), raising):
                    out.append(f"{where}/{r.name}.params.{key}={p[key]:g}")
            for m in _CLIP_CALL.finditer(r.call):
                if _clip_bad(float(m.group(1))):
                    out.append(f"{where}/{r.name}.call max_norm={m.group(1)}")
            for m in _LR_CALL.finditer(r.call):
                if _factor_bad(float(m.group(1)), raising):
                    out.append(f"{where}/{r.name}.call lr *= {m.group(1)}")
            for m in _CLIP_TEXT.finditer(r.description):
                if _clip_bad(float(m.group(1).rstrip("."))):
                    out.append(f"{where}/{r.name}.description clip at {m.group(1)}")
            for m in _LR_TEXT.finditer(r.description):
                v = float(m.group(1).rstrip("."))
                if v > 0 and _factor_bad(1 / v):
                    out.append(f"{where}/{r.name}.description lower lr {m.group(1)}x")
        for m in _CLIP_TEXT.finditer(fi.explanation):
            if _clip_bad(float(m.group(1).rstrip("."))):
                out.append(f"{where}.explanation clip at {m.group(1)}")
    return sorted(set(out))


# ----------------------------------------------------------------------------- evidence


def evidence(res: Result) -> list[str]:
    """What the detectors had to go on (for misses and false alarms)."""
    from gradmedic.diagnose.config import DiagnosisConfig
    from gradmedic.diagnose.in_time import fit_series
    from gradmedic.diagnose.profile import gain_series
    from gradmedic.diagnose.signals import ratio_points

    rows, cfg, lines = res.rows, DiagnosisConfig(), []
    layers = res.diagnosis.layers if res.diagnosis is not None else None
    lines.append(
        f"records {len(rows)}; loss noted: {res.setup.note_loss}; "
        f"keys {dict(res.diagnosis.coverage.keys) if res.diagnosis else {}}"
    )
    L = res.losses
    fin = [v for v in L if math.isfinite(v)]
    if L:
        lines.append(
            f"loss first {L[0]:.3g} min {min(fin) if fin else float('nan'):.3g} "
            f"max {max(fin) if fin else float('nan'):.3g} last {L[-1]:.3g}; "
            f"non-finite from step "
            f"{next((i for i, v in enumerate(L) if not math.isfinite(v)), None)}"
        )
    w = gain_series(rows, cfg.window, layers)
    one = gain_series(rows, 1, layers)
    if w:

        def fmt(p):
            return f"step {p.step}: gain {p.total_gain:.3g} R2 {p.r2:.2f}"

        lines.append(
            f"depth fit (window 5): first [{fmt(w[0])}] last [{fmt(w[-1])}] "
            f"max gain {max(p.total_gain for p in w):.3g} "
            f"min gain {min(p.total_gain for p in w):.3g}"
        )
        lines.append(
            f"depth fit (single): first [{fmt(one[0])}] "
            f"max {max(p.total_gain for p in one):.3g} "
            f"min {min(p.total_gain for p in one):.3g}; "
            f"max R2 {max(p.r2 for p in one):.2f}"
        )
    first = next((r for r in rows if r.get("delta_norm")), None)
    if first:
        d = first["delta_norm"]
        ks = list(d)
        lines.append(
            f"delta_norm step {first.get('step')}: first {ks[0]}={d[ks[0]]:.3g} "
            f"... last {ks[-1]}={d[ks[-1]]:.3g} ({len(ks)} layers)"
        )
    g = next((r for r in rows if r.get("grad_norm")), None)
    if g:
        d = g["grad_norm"]
        ks = list(d)
        lines.append(
            f"grad_norm step {g.get('step')}: first {ks[0]}={d[ks[0]]:.3g} "
            f"... last {ks[-1]}={d[ks[-1]]:.3g}"
        )
    gn = [r.get("global_grad_norm") for r in rows]
    gn = [v for v in gn if isinstance(v, float)]
    if gn:
        lines.append(f"global_grad_norm first {gn[0]:.3g} max {max(gn):.3g} last {gn[-1]:.3g}")
    rp = ratio_points(rows)
    if rp:
        lines.append(
            "update ratio (largest layer) per record: "
            + ", ".join(f"{p.step}:{p.value:.2g}" for p in rp)
        )
    acts = [(r.get("step"), r["activations"]) for r in rows if r.get("activations")]
    if acts:
        parts = []
        for step, a in acts:
            dead = max((v.get("dead_fraction", 0) for v in a.values()), default=0)
            sat = max((v.get("saturated_fraction", 0) or 0 for v in a.values()), default=0)
            parts.append(f"{step}:dead {dead:.2f}/sat {sat:.2f}")
        lines.append(f"activations ({len(acts)} records, max over modules): " + ", ".join(parts))
    for module, series in fit_series(rows, cfg).items():
        parts = [
            f"{p.step}:g {p.fits[0].per_step_gain:.3g} total {p.fits[0].total_gain:.3g} "
            f"horizon {p.fits[0].horizon}"
            for p in series
        ]
        lines.append(f"time fit {module} (T={series[-1].fits[0].seq_len}): " + "; ".join(parts))
    if res.diagnosis is not None and res.diagnosis.coverage is not None:
        nc = dict(res.diagnosis.coverage.not_checked)
        if nc:
            lines.append(f"not checked: {sorted(nc)}")
    return lines


# ----------------------------------------------------------------------------- report


def short(problems) -> str:
    return ",".join(sorted(problems)) or "-"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--details", action="store_true", help="evidence for every setup")
    args = ap.parse_args()
    chosen = setups()
    if args.only:
        names = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in names]
    t0 = time.perf_counter()
    results = []
    for s in chosen:
        r = run_setup(s, args.steps)
        results.append(r)
        print(f"  ran {s.name:28s} {r.seconds:5.1f}s {r.verdict}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    print(
        f"\n{'setup':28s} {'loss':4s} {'expected':22s} {'named (severity)':44s} "
        f"{'verdict':14s} first remedy"
    )
    print("-" * 160)
    for r in results:
        named = " ".join(f"{p}({sev[0].upper()})" for p, sev in r.named.items()) or "-"
        exp = short(r.setup.expected) + (f" root={r.setup.root}" if r.setup.root else "")
        rem = r.first_remedy if len(r.first_remedy) < 70 else r.first_remedy[:67] + "..."
        print(
            f"{r.setup.name:28s} {'yes' if r.setup.note_loss else 'no':4s} {exp:22s} "
            f"{named:44s} {r.verdict:14s} {rem}"
        )

    problems = [r for r in results if not r.setup.healthy]
    healthy = [r for r in results if r.setup.healthy]
    hits = [r for r in problems if r.verdict == "hit"]
    alarms = [r for r in healthy if r.verdict != "ok"]
    print(
        f"\nrecall: {len(hits)}/{len(problems)} problem setups"
        f" ({100 * len(hits) / max(1, len(problems)):.0f}%)"
    )
    print(
        f"false alarms: {len(alarms)}/{len(healthy)} healthy setups"
        + (f" ({', '.join(r.setup.name for r in alarms)})" if alarms else "")
    )
    for group, label in ((problems, "problem"), (healthy, "healthy")):
        loss = [r for r in group if r.setup.note_loss]
        if label == "problem":
            ok = lambda r: r.verdict == "hit"  # noqa: E731
        else:
            ok = lambda r: r.verdict == "ok"  # noqa: E731
        print(
            f"  {label} setups with note_loss: {sum(map(ok, loss))}/{len(loss)} correct; "
            f"without: {sum(ok(r) for r in group if not r.setup.note_loss)}/"
            f"{len(group) - len(loss)} correct"
        )

    print(
        "\ncheck() at init vs the run, non-runtime problems "
        "(vanishing/exploding/dead/saturation);"
        "\n  columns: vs whole run, vs the run's episodes starting at its first record:"
    )
    agree = agree0 = 0
    n = 0
    for r in results:
        if r.check_named is None:
            print(f"  {r.setup.name:28s} check() failed: {r.check_error}")
            continue
        n += 1
        a = r.check_named & NON_RUNTIME
        b = set(r.named) & NON_RUNTIME
        b0 = r.at_init & NON_RUNTIME
        same, same0 = a == b, a == b0
        agree += same
        agree0 += same0
        extra = r.check_named - NON_RUNTIME
        also = f"   (check also: {short(extra)})" if extra else ""
        print(
            f"  {r.setup.name:28s} {'same' if same else 'DIFF':4s} "
            f"{'same' if same0 else 'DIFF':4s} check={short(a):20s} run={short(b):30s} "
            f"run@init={short(b0)}{also}"
        )
    print(
        f"  agreement with the whole run: {agree}/{n}; with the run's problems present "
        f"from its first record: {agree0}/{n}"
    )

    print("\nabsurd numbers in remedies / suggested:")
    any_absurd = False
    for r in results:
        if r.absurd:
            any_absurd = True
            print(f"  {r.setup.name}: " + "; ".join(r.absurd))
    if not any_absurd:
        print("  none")

    print("\nroot causes and chains of problem setups:")
    for r in problems:
        if r.diagnosis is not None:
            ch = " -> ".join(f"{link.problem.value}@{link.step}" for link in r.diagnosis.chain)
            print(f"  {r.setup.name:28s} order={r.order} chain={ch or '-'}")

    bad = [r for r in results if r.verdict not in ("hit", "ok")]
    show = results if args.details else bad
    if show:
        print("\nevidence (misses, false alarms" + (", all" if args.details else "") + "):")
    for r in show:
        print(f"  [{r.verdict}] {r.setup.name} ({r.setup.note})")
        if r.error:
            print("    CRASH:\n" + "\n".join("      " + ln for ln in r.error.splitlines()))
            continue
        for ln in evidence(r):
            print("    " + ln)
        if r.diagnosis is not None:
            for f in r.diagnosis.findings:
                print(
                    f"    finding {f.problem.value}({f.severity.value}) step {f.step}: "
                    f"{f.explanation[:300]}"
                )

    print("\nwarnings emitted:")
    seen = False
    for r in results:
        for w in dict.fromkeys(r.warnings):
            seen = True
            print(f"  {r.setup.name}: {w[:300]}")
    if not seen:
        print("  none")
    crashes = [r for r in results if r.error]
    print(
        f"\ncrashes: {len(crashes)}"
        + (f" ({', '.join(r.setup.name for r in crashes)})" if crashes else "")
    )
    print(f"total time {total:.0f}s for {len(results)} setups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
