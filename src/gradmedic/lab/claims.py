"""The claims catalogue of the source material, as data (see CLAIMS.md).

Each claim has an id (``K`` for causes, ``R`` for remedies), a short title, the
claim in one or two sentences, and the seed texts that make it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """One claim of the source material.

    Attributes:
        id: ``"K1"`` ... ``"K7"``, ``"R1"`` ... ``"R10"``.
        title: A few words.
        text: The claim.
        seeds: The seed files (by number) that make it.
    """

    id: str
    title: str
    text: str
    seeds: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``"cause"`` or ``"remedy"``."""
        return "cause" if self.id.startswith("K") else "remedy"


_CLAIMS = (
    Claim(
        "K1",
        "chain product",
        "The gradient reaching layer t is a product of per-layer Jacobians diag(phi'(W h)) W; "
        "with one neuron per layer, dC/db1 = dC/dy_L * sigma'(z_L) w_L * ... * sigma'(z_2) w_2 "
        "* sigma'(z_1).",
        ("003", "004"),
    ),
    Claim(
        "K2",
        "sigmoid bound",
        "sigma'(z) = sigma(z)(1 - sigma(z)) <= 1/4; with |w| < 1 each factor is <= 1/4, so the "
        "gradient shrinks at least as 4^-L. Exploding needs |sigma'(z) w| > 1, which needs large "
        "w and inputs in a narrow range.",
        ("001", "004"),
    ),
    Claim(
        "K3",
        "tanh",
        "tanh'(x) = 1 - tanh(x)^2 <= 1: better than sigmoid but still shrinking, and near 0 far "
        "from the origin (saturation).",
        ("001", "002"),
    ),
    Claim(
        "K4",
        "depth asymmetry",
        "In a deep net the layers near the output learn normally while those near the input "
        "learn slowly; after long training the first layers' weights stay close to their "
        "initial values.",
        ("001", "004"),
    ),
    Claim(
        "K5",
        "recurrent explosion and decay",
        "Backprop through time multiplies by the same W_h at every step; the L2 norm of dh grows "
        "exponentially when the largest singular value of W_h is above 1 and decays when it is "
        "below 1.",
        ("002",),
    ),
    Claim(
        "K6",
        "learning rate",
        "Too large a step overshoots and inflates parameters, which inflates gradients: training "
        "diverges; too small a step barely moves. Adaptive learning rates respond to this.",
        ("001", "003"),
    ),
    Claim("K7", "vanishing is more common", "Vanishing is the more common failure.", ("001",)),
    Claim(
        "R1",
        "residual connections",
        "x_{l+1} = x_l + F(x_l) adds an identity path whose Jacobian is 1; a deep residual net "
        "trains no worse than a shallow one.",
        ("000", "001"),
    ),
    Claim(
        "R2",
        "ReLU family",
        "ReLU's slope is exactly 1 for x > 0, so it does not scale the gradient; ELU and Leaky "
        "ReLU are variants.",
        ("000", "001", "004"),
    ),
    Claim(
        "R3",
        "dead ReLU",
        "A ReLU whose pre-activation is negative for every input gets zero gradient and never "
        "recovers; Leaky ReLU gives it a way back. Adding N layers divides the activation rate "
        "by 2^N.",
        ("003", "004"),
    ),
    Claim(
        "R4",
        "initialization",
        "Xavier (Glorot) and He (Kaiming) scale the variance to fan-in/fan-out so the signal and "
        "gradient keep their size across layers.",
        ("000", "004"),
    ),
    Claim(
        "R5",
        "weight regularization",
        "An L2 penalty keeps weight norms small and so limits the product that causes explosion.",
        ("000", "001"),
    ),
    Claim(
        "R6",
        "batch normalization",
        "Normalizing each layer's pre-activations keeps them in the non-saturated range of the "
        "activation and stabilizes the gradient.",
        ("000", "001", "004"),
    ),
    Claim(
        "R7",
        "gradient clipping",
        "Clipping by global norm (g <- threshold/||g|| g when ||g|| >= threshold) or by value "
        "keeps exploding gradients in check.",
        ("001", "002", "004"),
    ),
    Claim(
        "R8",
        "LSTM",
        "The gradient along the cell state is multiplied element-wise by a different forget gate "
        "at each step, not by one matrix, so it neither explodes nor vanishes systematically.",
        ("002",),
    ),
    Claim(
        "R9",
        "GRU",
        "h_t = (1 - z_t) h_{t-1} + z_t h~_t: the gradient splits like a residual connection; "
        "with z_t = 0 the state is copied unchanged.",
        ("000",),
    ),
    Claim(
        "R10",
        "layer-wise pre-training",
        "Train one hidden layer at a time without labels, then fine-tune the whole network.",
        ("001",),
    ),
)

CLAIMS: dict[str, Claim] = {c.id: c for c in _CLAIMS}
"""Every claim, by id, in catalogue order (K1-K7, then R1-R10)."""
