"""The claims catalogue of the source material, as data (see CLAIMS.md).

Each claim has an id (``K`` for causes, ``R`` for remedies), a short title, the
claim in one or two sentences, and the source texts that make it (by number:
:data:`SOURCES` gives each one's title). The source texts are five Chinese
articles and study notes on vanishing and exploding gradients; "source 004" in
the lab means the fifth of them, not a random seed.
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
        seeds: The source texts (by number, keys of :data:`SOURCES`) that make it.
    """

    id: str
    title: str
    text: str
    seeds: tuple[str, ...]

    @property
    def sources(self) -> list[Source]:
        """The source texts that make this claim."""
        return [SOURCES[s] for s in self.seeds]

    @property
    def kind(self) -> str:
        """``"cause"`` or ``"remedy"``."""
        return "cause" if self.id.startswith("K") else "remedy"


@dataclass(frozen=True)
class Source:
    """One source text of the claims catalogue.

    Attributes:
        id: ``"000"`` ... ``"004"``.
        title: The title as the text gives it (Chinese).
        english: The title in English.
        author: Author or origin where the text names one, else a description.
        about: What the text covers, in a few words.
    """

    id: str
    title: str
    english: str
    author: str
    about: str

    @property
    def label(self) -> str:
        """``"source 004, 'Vanishing and exploding gradients'"``: how the lab cites it."""
        return f"source {self.id}, '{self.english}'"


SOURCES: dict[str, Source] = {
    s.id: s
    for s in (
        Source(
            "000",
            "缓解梯度消失和梯度爆炸的方法",
            "Ways to ease vanishing and exploding gradients",
            "a one-minute blog post (author not named)",
            "residual connections, ReLU, initialization, batch norm, GRU as a gated shortcut",
        ),
        Source(
            "001",
            "深度学习中的梯度",
            "Gradients in deep learning",
            "an article (author not named)",
            "gradient descent, the causes of vanishing/exploding gradients, five remedies",
        ),
        Source(
            "002",
            "RNN存在的问题 / 梯度消失的对策——LSTM",
            "The problems of RNNs; LSTM against vanishing gradients",
            "study notes on a textbook chapter (the book's W_h power experiment and clip_grads)",
            "backprop through time, gradient clipping, LSTM gates",
        ),
        Source(
            "003",
            "梯度爆炸与梯度消失",
            "Exploding and vanishing gradients",
            "handwritten-style lecture notes (author not named)",
            "the MLP Jacobian product, dead ReLU, ReLU activation rate",
        ),
        Source(
            "004",
            "梯度消失和梯度爆炸",
            "Vanishing and exploding gradients",
            "an article with TensorFlow code on MNIST (author not named)",
            "the sigmoid chain, initialization, ReLU variants, batch-norm and clipping recipes",
        ),
    )
}
"""The source texts, by id (their files are ``seeds/NNN_*.txt`` of the project's notes)."""


@dataclass(frozen=True)
class Paper:
    """A paper whose own result the lab reproduces beside the source texts' claims.

    Attributes:
        id: Short key, e.g. ``"he2015"``.
        authors: As usually cited.
        year: Publication year.
        title: Title.
        venue: Where it appeared.
        url: A stable link (arXiv or the proceedings).
    """

    id: str
    authors: str
    year: int
    title: str
    venue: str
    url: str

    @property
    def cite(self) -> str:
        """``"He et al. 2015, 'Delving Deep into Rectifiers'"``."""
        return f"{self.authors} {self.year}, '{self.title}'"


PAPERS: dict[str, Paper] = {
    p.id: p
    for p in (
        Paper(
            "glorot2010",
            "Glorot & Bengio",
            2010,
            "Understanding the difficulty of training deep feedforward neural networks",
            "AISTATS 2010",
            "https://proceedings.mlr.press/v9/glorot10a.html",
        ),
        Paper(
            "pascanu2013",
            "Pascanu et al.",
            2013,
            "On the difficulty of training recurrent neural networks",
            "ICML 2013",
            "https://arxiv.org/abs/1211.5063",
        ),
        Paper(
            "he2015",
            "He et al.",
            2015,
            "Delving Deep into Rectifiers: Surpassing Human-Level Performance on ImageNet "
            "Classification",
            "ICCV 2015",
            "https://arxiv.org/abs/1502.01852",
        ),
        Paper(
            "schoenholz2017",
            "Schoenholz et al.",
            2017,
            "Deep Information Propagation",
            "ICLR 2017",
            "https://arxiv.org/abs/1611.01232",
        ),
        Paper(
            "pennington2017",
            "Pennington et al.",
            2017,
            "Resurrecting the sigmoid in deep learning through dynamical isometry: theory and "
            "practice",
            "NeurIPS 2017",
            "https://arxiv.org/abs/1711.04735",
        ),
    )
}
"""The papers of the paper-result experiments (``paper_*``), by id."""


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
