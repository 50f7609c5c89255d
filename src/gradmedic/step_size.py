"""Will this optimizer train this model? The preflight's step judgement.

A trial run of the user's optimizer on copies of the model and the optimizer
(:mod:`gradmedic.trial_steps`), on minibatches drawn from the examples given to
``check()``, is judged by what its loss does, relative to the loss of knowing
nothing (``reference``: the loss at init, or of predicting the label
frequencies / the target mean, whichever is lower):

* ``diverged``: a trial loss became non-finite;
* ``no_fit``: the loss never got below half the reference and has stopped
  falling (at the rate of the trial's last quarter, another trial as long would
  not get it there), on examples a linear model learns
  (:mod:`gradmedic.learnable`: random labels are no finding). The top Hessian
  eigenvalue (:mod:`gradmedic.curvature`) against the optimizer's stability
  limit names the reason: past it, the step overshoots (``unstable_updates``,
  lower the lr); inside it, the step is too short for this init
  (``small_steps``, raise the lr into the room the limit leaves);
* ``sharpness``: the sharpness at init or after the trial is past the limit and
  the loss ends no lower than it started (what a trial shorter than :data:`MIN_FIT_STEPS`
  can judge, and an lr so large the loss stays above where it began).

A trial that learns and then falls back is *not* a verdict: on the
trainability grid such trials (SGD momentum on deep tanh nets) trained as often
as they failed (``docs/preflight.md``).

The loss is judged as means over windows of a tenth of the trial, so one noisy
minibatch decides nothing. A net that can learn fits the few hundred examples of
a trial far below half the reference; the halfway mark is the midpoint between
"learned nothing" and "learned everything", not a value fitted to a grid. The
judgement covers the trial steps taken; the runtime probe
(:mod:`gradmedic.probes.curvature`) watches the curvature later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic.curvature import Limit, sharpness, stability_limit
from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.small_steps import raise_factor
from gradmedic.errors import GradmedicError
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.private import private_work
from gradmedic.remedies import catalog
from gradmedic.trial_steps import OptimizerLike, TrialRun, facts_of, trial_steps

#: The safe lr suggested is this share of the largest stable one (room for sharpening).
MARGIN = 0.5
#: The lr is never cut by more than this factor: a sharpness that needs more is
#: the init's doing (exploding gradients), and the remedy is a warmup, not lr x1e-9.
MIN_FACTOR = 1e-3
#: The lr is never raised by more than this factor on the preflight's evidence.
MAX_RAISE = 10.0
#: A trial is judged by its loss only from this many steps on (fewer: divergence and sharpness).
MIN_FIT_STEPS = 100
#: The share of the reference loss the trial must get below to count as learning.
FIT = 0.5
#: A loss that fell by less than this share of the reference made no progress.
STALL = 0.1
#: The trial stops early once its loss is below this share of the reference (learned).
LEARNED = 0.1

VERDICTS = ("healthy", "diverged", "no_fit", "sharpness")


def windowed(losses: Sequence[float], window: int) -> list[float]:
    """Means of ``losses`` over each run of ``window`` consecutive steps.

    Example:
        >>> windowed([4.0, 2.0, 3.0, 1.0], 2)
        [3.0, 2.5, 2.0]
    """
    if window < 1 or len(losses) < window:
        return []
    total = sum(losses[:window])
    out = [total / window]
    for k in range(window, len(losses)):
        total += losses[k] - losses[k - window]
        out.append(total / window)
    return out


def window_of(steps: int) -> int:
    """The window the trial loss is judged over: a tenth of the steps, at least 1."""
    return max(1, steps // 10)


def constant_baseline(targets: torch.Tensor | None) -> float:
    """The default loss of the best input-independent prediction (nan: not known).

    Cross-entropy on integer targets: the entropy of the label frequencies; MSE on
    float targets: the variance of each target around its mean, averaged.

    Example:
        >>> round(constant_baseline(torch.tensor([0, 0, 1, 1])), 4)  # ln 2
        0.6931
    """
    if not isinstance(targets, torch.Tensor) or targets.numel() == 0:
        return math.nan
    if not targets.is_floating_point():
        _, counts = torch.unique(targets, return_counts=True)
        p = counts.double() / counts.sum()
        return float(-(p * p.log()).sum())
    y = targets.detach().double()
    return float((y - y.mean(dim=0, keepdim=True)).pow(2).mean()) if y.dim() > 0 else 0.0


@dataclass(frozen=True)
class StepJudgement:
    """The trial run and the curvature against the stability limit, as measured.

    Attributes:
        optimizer: The optimizer's class name.
        lr: Its learning rate (first parameter group).
        limit: The stability limit (:class:`~gradmedic.curvature.Limit`).
        sharpness_init: Top eigenvalue at init (preconditioned for Adam/AdamW).
        sharpness_trial: The same after the trial steps.
        trial_losses: The minibatch loss before each trial step.
        iterations: Hessian-vector products taken.
        converged: Whether both eigenvalue estimates converged.
        planned_steps: The trial's length; fewer were taken when it stopped early.
        reference: The loss of knowing nothing (``min(loss at init, baseline)``).
        baseline: The loss of the best constant prediction (nan: not known).
        batch: Examples per trial step.
        examples: Examples the trial draws its minibatches from.
        headroom: A linear reference's held-apart loss over the constant's
            (:func:`gradmedic.learnable.linear_headroom`; nan: not known).
    """

    optimizer: str
    lr: float
    limit: Limit
    sharpness_init: float
    sharpness_trial: float
    trial_losses: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    planned_steps: int = 0
    reference: float = math.nan
    baseline: float = math.nan
    batch: int = 0
    examples: int = 0
    headroom: float = math.nan

    @property
    def judged(self) -> bool:
        """Whether the optimizer has a stability rule and the curvature was measured."""
        return math.isfinite(self.limit.limit) and math.isfinite(self.sharpest)

    @property
    def diverged(self) -> bool:
        """A trial loss became non-finite."""
        return any(not math.isfinite(v) for v in self.trial_losses)

    @property
    def sharpest(self) -> float:
        """The larger finite one of the sharpness at init and after the trial (nan: none)."""
        values = [v for v in (self.sharpness_init, self.sharpness_trial) if math.isfinite(v)]
        return max(values) if values else math.nan

    @property
    def rose(self) -> int | None:
        """The first trial step whose loss reached the critical divergence level (None: never).

        That level is ``loss_rise ** 2`` times the reference (9x with the default
        :class:`~gradmedic.diagnose.DiagnosisConfig`, where ``watch()`` calls a
        divergence critical). Steps too short to learn never lift the loss there: a
        stalled trial that did overshot, although the curvature at init and after the
        trial may both sit inside the limit (the steps made it grow in between).
        """
        level = DiagnosisConfig().loss_rise ** 2 * self.reference
        return next((k for k, v in enumerate(self.trial_losses) if v >= level), None)

    @property
    def learnable(self) -> bool:
        """A linear model learns the examples (its held-apart loss beats the constant's)."""
        return self.headroom <= 1 - STALL

    @property
    def fit(self) -> list[float]:
        """The trial loss averaged over windows of a tenth of the steps taken."""
        return windowed(self.trial_losses, window_of(len(self.trial_losses)))

    @property
    def fit_judged(self) -> bool:
        """Long enough a trial, with a positive reference and no negative loss."""
        return (
            len(self.trial_losses) >= MIN_FIT_STEPS
            and math.isfinite(self.reference)
            and self.reference > 0
            and min(self.trial_losses, default=0.0) >= 0
        )

    @property
    def stalled(self) -> bool:
        """The loss never got below half the reference and has stopped falling.

        Stopped: at the rate of the trial's last quarter, another trial as long
        would still leave it above half the reference.
        """
        fit, ref = self.fit, self.reference
        if not fit or min(fit) <= FIT * ref:
            return False
        quarter = max(1, len(fit) // 4)
        drop = max(0.0, fit[-1 - quarter] - fit[-1]) if len(fit) > quarter else 0.0
        return fit[-1] - drop * len(self.trial_losses) / quarter > FIT * ref

    @property
    def verdict(self) -> str:
        """One of :data:`VERDICTS`; see the module docstring."""
        if self.diverged:
            return "diverged"
        fit = self.fit
        if self.fit_judged and self.learnable and self.stalled:
            return "no_fit"
        start = self.reference if math.isfinite(self.reference) else (fit[0] if fit else 0.0)
        if self.judged and self.sharpest > self.limit.limit and fit and fit[-1] >= start:
            return "sharpness"
        return "healthy"

    @property
    def unstable(self) -> bool:
        """Whether the trial found trouble (any verdict but ``healthy``)."""
        return self.verdict != "healthy"

    @property
    def largest_safe_lr(self) -> float:
        """The lr at which the measured sharpness sits at the limit."""
        s = self.sharpest
        if not (self.judged and s > 0):
            return math.nan
        return self.lr * self.limit.limit / s

    @property
    def horizon(self) -> int:
        """Steps the judgement covers: the trial steps taken."""
        return max(len(self.trial_losses), 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``Diagnosis.context["step_size"]``."""
        data = asdict(self)
        data.update(
            verdict=self.verdict,
            unstable=self.unstable,
            largest_safe_lr=self.largest_safe_lr,
            horizon_steps=self.horizon,
            fit_end=self.fit[-1] if self.fit else math.nan,
            fit_min=min(self.fit) if self.fit else math.nan,
        )
        return data

    def finding(self) -> Finding | None:
        """The finding, or None when the trial found no trouble."""
        verdict = self.verdict
        if verdict == "healthy":
            return None
        if verdict == "no_fit" and not self.sharpest > self.limit.limit and self.rose is None:
            return _small_steps(self)  # a stall without overshoot: steps too short
        return _finding(self)


@private_work()
def judge_step(
    model: nn.Module,
    optimizer: OptimizerLike,
    loss_of: Callable[[nn.Module], torch.Tensor],
    *,
    steps: int = 10,
    step_loss: Callable[[nn.Module, int], torch.Tensor] | None = None,
    baseline: float = math.nan,
    headroom: float = math.nan,
    batch: int = 0,
    examples: int = 0,
    iterations: int = 20,
    tol: float = 1e-2,
) -> StepJudgement:
    """Run the trial, measure the sharpness at init and after it, compare with the limit.

    ``model`` and ``optimizer`` are not changed (copies are stepped, RNG restored).
    Each eigenvalue is found to ``tol`` (relative; 1% is ample for a verdict against
    a limit), the one after the trial warm-started from the one at init.

    Args:
        model: The user's model.
        optimizer: The user's optimizer or a factory.
        loss_of: The loss of the curvature batch (also the reference at init).
        steps: Most trial steps; the trial stops once its loss is below
            :data:`LEARNED` of the reference.
        step_loss: ``step_loss(model, k)``: the minibatch loss of step ``k``
            (``loss_of`` when None).
        baseline: The loss of the best constant prediction (:func:`constant_baseline`).
        headroom: :func:`gradmedic.learnable.linear_headroom` of the examples.
        batch: Examples per step, for the report.
        examples: Examples the minibatches are drawn from, for the report.
        iterations: Most Hessian-vector products per eigenvalue.
        tol: Relative tolerance of each eigenvalue.
    """
    from gradmedic.trial_steps import cuda_devices, preserved_rng, private_copy

    with preserved_rng(cuda_devices(model)), torch.no_grad():
        start = float(loss_of(private_copy(model).train()))
    reference = min(start, baseline) if math.isfinite(baseline) else start

    def learned(losses: Sequence[float]) -> bool:
        if len(losses) < MIN_FIT_STEPS or not reference > 0:
            return False
        tail = losses[-window_of(len(losses)) :]
        return sum(tail) / len(tail) <= LEARNED * reference

    run = trial_steps(model, optimizer, loss_of, steps=steps, step_loss=step_loss, stop=learned)
    if run.model is None or run.optimizer is None or run.initial_model is None:
        raise GradmedicError("the trial steps returned no model copy")
    facts = facts_of(run.optimizer)
    limit = stability_limit(facts)
    setup: dict[str, Any] = {"planned_steps": steps, "reference": reference, "batch": batch}
    setup.update(baseline=baseline, headroom=headroom, examples=examples)
    with preserved_rng(cuda_devices(model)):
        init = _measure(
            run.initial_model, loss_of, iterations, tol, _scale_at_init(run, loss_of, limit)
        )
        if run.diverged:
            trial = init
        else:
            scale = _scale_of(run.optimizer, limit)
            trial = _measure(run.model, loss_of, iterations, tol, scale, start=init[3])
    return StepJudgement(
        optimizer=str(facts.get("type")),
        lr=limit.lr,
        limit=limit,
        sharpness_init=init[0],
        sharpness_trial=math.inf if run.diverged else trial[0],
        trial_losses=list(run.losses),
        iterations=init[1] + (0 if trial is init else trial[1]),
        converged=init[2] and trial[2],
        **setup,
    )


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _measure(
    model: nn.Module,
    loss_of: Callable[[nn.Module], torch.Tensor],
    iterations: int,
    tol: float,
    scale: list[torch.Tensor] | bool | None,
    start: list[torch.Tensor] | None = None,
) -> tuple[float, int, bool, list[torch.Tensor] | None]:
    if scale is False:  # preconditioner unknown
        return math.nan, 0, False, None
    model.train()
    try:
        eig = sharpness(
            lambda: loss_of(model),
            _params(model),
            iterations=iterations,
            tol=tol,
            start=start,
            scale=scale if isinstance(scale, list) else None,
        )
    except (RuntimeError, FloatingPointError):  # no second derivative (e.g. a custom op)
        return math.nan, 0, False, None
    return eig.value, eig.iterations, eig.converged, eig.vector


def _adam_scale(v_hat: list[torch.Tensor], lr: float, eps: float) -> list[torch.Tensor]:
    """``D = lr / (sqrt(v_hat) + eps)``: Adam's step is ``D * m_hat``, so P^-1 H = D H."""
    return [lr / (v.sqrt() + eps) for v in v_hat]


def _scale_at_init(
    run: TrialRun, loss_of: Callable[[nn.Module], torch.Tensor], limit: Limit
) -> list[torch.Tensor] | bool | None:
    if limit.kind != "preconditioned":
        return None
    # Adam's bias-corrected first step has v_hat = g_0^2: measure P at init from it.
    assert run.initial_model is not None and run.optimizer is not None
    params = _params(run.initial_model)
    group = run.optimizer.param_groups[0]
    grads = torch.autograd.grad(loss_of(run.initial_model), params, allow_unused=True)
    v_hat = [
        g.detach() ** 2 if g is not None else torch.zeros_like(p)
        for g, p in zip(grads, params, strict=True)
    ]
    return _adam_scale(v_hat, float(group["lr"]), float(group.get("eps", 1e-8)))


def _scale_of(optimizer: torch.optim.Optimizer, limit: Limit) -> list[torch.Tensor] | bool | None:
    if limit.kind != "preconditioned":
        return None
    out: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        b2 = float(group["betas"][1])
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                return False
            t = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1.0 - b2**t)
            out.append(float(group["lr"]) / (v_hat.sqrt() + float(group["eps"])))
    return out


def _trial_text(j: StepJudgement) -> str:
    """What the trial was and what its loss did, in one clause."""
    where = f" on minibatches of {j.batch} of the {j.examples} examples given" if j.examples else ""
    head = f"{len(j.trial_losses)} trial steps of {j.optimizer} at lr {j.lr:g}{where}"
    fit = j.fit
    if not fit:
        return head
    base = f"; the best constant prediction scores {j.baseline:.3g}" if j.baseline >= 0 else ""
    return (
        f"{head}: the loss (mean over {window_of(len(j.trial_losses))} steps) went from "
        f"{j.reference:.3g} (knowing nothing{base}) to {min(fit):.3g} at best and "
        f"{fit[-1]:.3g} at the end"
    )


def _sharpness_text(j: StepJudgement) -> str:
    lim = j.limit
    what = "P^-1 H (Adam's preconditioned sharpness)" if lim.kind == "preconditioned" else "H"
    return (
        f"The top eigenvalue of {what} is {j.sharpness_init:.3g} at init and "
        f"{j.sharpness_trial:.3g} after the trial, against the stability limit "
        f"{lim.limit:.3g} ({lim.rule})"
    )


def _horizon_text(j: StepJudgement) -> str:
    return (
        f"The prediction covers the first {j.horizon} steps: curvature can grow later "
        "(progressive sharpening); watch it during training with gradmedic.watch(..., "
        "probes=[CurvatureProbe()]) (from gradmedic.probes.curvature)."
    )


_WHY = {
    "diverged": "the step is too long for the loss's curvature and each one lands higher",
    "no_fit": "the step overshoots along the sharpest direction instead of descending (at "
    "init or later), and the net settles where it cannot fit examples a linear model learns",
    "sharpness": "the step overshoots along the sharpest direction instead of descending, and "
    "did not find a flatter region by itself over the trial steps",
}


def _finding(j: StepJudgement) -> Finding:
    lim = j.limit
    verdict = j.verdict
    if verdict == "diverged":
        head = (
            f"A trial step of {j.optimizer} at lr {j.lr:g} made the loss non-finite within "
            f"{len(j.trial_losses)} steps"
        )
    else:
        head = _trial_text(j) + (". " + _sharpness_text(j) if j.judged else "")
        head = head[0].upper() + head[1:]
    safe = j.largest_safe_lr
    known = math.isfinite(safe) and safe < j.lr  # a stable lr above this one sizes no cut
    rose = j.rose
    if rose is not None and not j.sharpest > lim.limit:
        head += (
            f". At trial step {rose} the loss reached {j.trial_losses[rose]:.3g}, over "
            f"{DiagnosisConfig().loss_rise ** 2:g}x the start, while the curvature at init and "
            "after the trial is inside the limit: the steps made it grow in between"
        )
    text = (
        f"{head}: {_WHY[verdict]}. "
        + (f"The largest stable lr for this curvature is {safe:.3g}. " if known else "")
        + _horizon_text(j)
    )
    factor = MARGIN * safe / j.lr if known and j.lr > 0 else 0.1
    factor = float(f"{min(factor, 0.5):.2g}")  # a round factor: 0.02, not 0.0197818
    remedies: list[Remedy] = []
    if factor >= MIN_FACTOR:
        remedies.append(
            catalog.lower_lr(
                factor,
                f"at most {MARGIN:g}x the largest stable lr {safe:.3g} for the measured "
                f"sharpness ({lim.rule})"
                if known
                else "a shorter step",
                lr=[j.lr],
            )
        )
    else:
        text += (
            f" No sane lr fits a sharpness of {j.sharpest:.3g}: "
            "it comes from the initialization (see an exploding or saturation finding); fix "
            "that first."
        )
        factor = MIN_FACTOR
    remedies.append(
        catalog.warmup(
            factor,
            100,
            "small first steps let the net leave the sharp region at init before the full lr",
        )
    )
    ratio = j.sharpness_trial / lim.limit if lim.limit > 0 else math.inf
    severity = Severity.CRITICAL if verdict == "diverged" or ratio >= 10 else Severity.WARNING
    return _build(j, Problem.UNSTABLE_UPDATES, severity, text, remedies, factor)


def _small_steps(j: StepJudgement) -> Finding:
    room = j.limit.limit / j.sharpest if j.sharpest > 0 else math.inf
    text = (
        _trial_text(j)[0].upper()
        + _trial_text(j)[1:]
        + f", above half the first, on examples a linear model learns (held apart, its "
        f"loss is {j.headroom:.2g}x the constant's). "
        + _sharpness_text(j)
        + f": the step is {room:.3g}x shorter than the longest stable one, and too short "
        "for this init to learn in (or the net maps its inputs to nearly the same output, "
        "the ordered phase of a deep net). " + _horizon_text(j)
    )
    remedies: list[Remedy] = []
    factor = 1.0
    if MARGIN * room >= 3.0:
        factor = raise_factor(j.sharpest, MARGIN * j.limit.limit, (3.0, MAX_RAISE))
        remedies.append(
            catalog.raise_lr(
                factor,
                f"the measured sharpness allows {room:.3g}x the lr ({j.limit.rule}); "
                f"this keeps a margin of {1 / MARGIN:g}",
                lr=[j.lr],
            )
        )
    remedies.append(
        catalog.normalization(
            "batch",
            "keeps every layer's pre-activations at unit scale, so the inputs stay "
            "distinguishable through depth and the steps reach every layer",
        )
    )
    return _build(j, Problem.SMALL_STEPS, Severity.WARNING, text, remedies, factor)


def _build(
    j: StepJudgement,
    problem: Problem,
    severity: Severity,
    text: str,
    remedies: list[Remedy],
    factor: float,
) -> Finding:
    fit = j.fit
    return Finding(
        problem=problem,
        severity=severity,
        layers=[],
        evidence={
            "rule": j.verdict,
            "optimizer": j.optimizer,
            "lr": j.lr,
            "sharpness_init": j.sharpness_init,
            "sharpness_trial": j.sharpness_trial,
            "sharpness_kind": j.limit.kind,
            "limit": j.limit.limit,
            "limit_rule": j.limit.rule,
            "largest_safe_lr": j.largest_safe_lr,
            "trial_steps": len(j.trial_losses),
            "trial_losses": list(j.trial_losses),
            "reference_loss": j.reference,
            "baseline_loss": j.baseline,
            "linear_headroom": j.headroom,
            "fit_min": min(fit) if fit else math.nan,
            "fit_end": fit[-1] if fit else math.nan,
            "horizon_steps": j.horizon,
            "lr_factor": factor,
        },
        explanation=text,
        remedies=remedies,
        step=None,
    )
