"""Will this optimizer's step fit the loss? The preflight's step-size judgement.

The loss curvature (top Hessian eigenvalue, :mod:`gradmedic.curvature`) is
measured at init and again after a few trial steps on a copy
(:mod:`gradmedic.trial_steps`), and compared against the optimizer's stability
limit. A step past the limit overshoots along the top eigen-direction; past it
*after* the trial steps, the step has not found a flatter region by itself
(the catapult of Lewkowycz et al. 2020) and training will oscillate or fall
back. Curvature grows while training (progressive sharpening, Cohen et al.
2021), so the judgement holds for about the trial steps measured; the runtime
probe (:mod:`gradmedic.probes.curvature`) watches the same quantity later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic.curvature import Limit, sharpness, stability_limit
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.private import private_work
from gradmedic.remedies import catalog
from gradmedic.trial_steps import OptimizerLike, TrialRun, facts_of, trial_steps

#: The safe lr suggested is this share of the largest stable one (room for sharpening).
MARGIN = 0.5
#: The lr is never cut by more than this factor: a sharpness that needs more is
#: the init's doing (exploding gradients), and the remedy is a warmup, not lr x1e-9.
MIN_FACTOR = 1e-3


@dataclass(frozen=True)
class StepJudgement:
    """The step size against the curvature, as measured by the preflight.

    Attributes:
        optimizer: The optimizer's class name.
        lr: Its learning rate (first parameter group).
        limit: The stability limit (:class:`~gradmedic.curvature.Limit`).
        sharpness_init: Top eigenvalue at init (preconditioned for Adam/AdamW).
        sharpness_trial: The same after the trial steps.
        trial_losses: The loss before each trial step.
        iterations: Hessian-vector products taken.
        converged: Whether both eigenvalue estimates converged.
    """

    optimizer: str
    lr: float
    limit: Limit
    sharpness_init: float
    sharpness_trial: float
    trial_losses: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True

    @property
    def judged(self) -> bool:
        """Whether the optimizer has a stability rule and the curvature was measured."""
        return math.isfinite(self.limit.limit) and math.isfinite(self.sharpness_trial)

    @property
    def diverged(self) -> bool:
        """A trial loss became non-finite."""
        return any(not math.isfinite(v) for v in self.trial_losses)

    @property
    def descended(self) -> bool:
        """The trial loss fell over the trial steps."""
        return len(self.trial_losses) >= 2 and self.trial_losses[-1] < self.trial_losses[0]

    @property
    def unstable(self) -> bool:
        """The trial diverged, or the step is past the limit and the trial loss did not fall.

        Past the limit alone is not enough: deep saturating nets often train with
        a local sharpness far above ``2/lr`` (the quadratic model holds only in a
        ball smaller than one step), so a verdict on sharpness alone would call
        nets that train unstable.
        """
        if self.diverged:
            return True
        return self.judged and self.sharpness_trial > self.limit.limit and not self.descended

    @property
    def largest_safe_lr(self) -> float:
        """The lr at which the measured sharpness sits at the limit."""
        s = max(self.sharpness_init, self.sharpness_trial)
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
            unstable=self.unstable,
            largest_safe_lr=self.largest_safe_lr,
            horizon_steps=self.horizon,
        )
        return data

    def finding(self) -> Finding | None:
        """The step-size finding, or None when the step fits."""
        if not self.unstable:
            return None
        return _finding(self)


@private_work()
def judge_step(
    model: nn.Module,
    optimizer: OptimizerLike,
    loss_of: Callable[[nn.Module], torch.Tensor],
    *,
    steps: int = 10,
    iterations: int = 20,
    tol: float = 1e-2,
) -> StepJudgement:
    """Measure sharpness at init and after ``steps`` trial steps; compare with the limit.

    ``model`` and ``optimizer`` are not changed (copies are stepped, RNG restored).
    Each eigenvalue is found to ``tol`` (relative; 1% is ample for a verdict against
    a limit), the one after the trial steps warm-started from the one at init.
    """
    from gradmedic.trial_steps import cuda_devices, preserved_rng

    run = trial_steps(model, optimizer, loss_of, steps=steps)
    assert run.model is not None and run.optimizer is not None and run.initial_model is not None
    facts = facts_of(run.optimizer)
    limit = stability_limit(facts)
    kind = str(facts.get("type"))
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
        optimizer=kind,
        lr=limit.lr,
        limit=limit,
        sharpness_init=init[0],
        sharpness_trial=math.inf if run.diverged else trial[0],
        trial_losses=list(run.losses),
        iterations=init[1] + (0 if trial is init else trial[1]),
        converged=init[2] and trial[2],
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


def _finding(j: StepJudgement) -> Finding:
    lim = j.limit
    what = "P^-1 H (Adam's preconditioned sharpness)" if lim.kind == "preconditioned" else "H"
    if j.diverged:
        head = (
            f"A trial step of {j.optimizer} at lr {j.lr:g} made the loss non-finite within "
            f"{len(j.trial_losses)} steps"
        )
    else:
        head = (
            f"The top eigenvalue of {what} is {j.sharpness_init:.3g} at init and "
            f"{j.sharpness_trial:.3g} after {len(j.trial_losses)} trial steps of {j.optimizer} "
            f"at lr {j.lr:g}, past the stability limit {lim.limit:.3g} ({lim.rule})"
        )
    safe = j.largest_safe_lr
    known = math.isfinite(safe)
    text = (
        f"{head}: the step overshoots along the sharpest direction instead of descending, "
        "and did not find a flatter region by itself over the trial steps, so the loss "
        "oscillates, rises or falls back after first learning. "
        + (f"The largest stable lr for this curvature is {safe:.3g}. " if known else "")
        + f"The prediction covers about the first {j.horizon} steps: curvature can grow later "
        "(progressive sharpening); watch it during training with gradmedic.watch(..., "
        "probes=[CurvatureProbe()]) (from gradmedic.probes.curvature)."
    )
    factor = MARGIN * safe / j.lr if known and j.lr > 0 else 0.1
    factor = float(f"{min(factor, 0.5):.2g}")  # a round factor: 0.02, not 0.0197818
    remedies: list[Remedy] = []
    if factor >= MIN_FACTOR:
        remedies.append(
            catalog.lower_lr(
                factor,
                f"about {MARGIN:g}x the largest stable lr {safe:.3g} for the measured "
                f"sharpness ({lim.rule})",
                lr=[j.lr],
            )
        )
    else:
        text += (
            f" No sane lr fits a sharpness of {max(j.sharpness_init, j.sharpness_trial):.3g}: "
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
    severity = Severity.CRITICAL if j.diverged or ratio >= 10 else Severity.WARNING
    return Finding(
        problem=Problem.UNSTABLE_UPDATES,
        severity=severity,
        layers=[],
        evidence={
            "rule": "sharpness",
            "optimizer": j.optimizer,
            "lr": j.lr,
            "sharpness_init": j.sharpness_init,
            "sharpness_trial": j.sharpness_trial,
            "sharpness_kind": lim.kind,
            "limit": lim.limit,
            "limit_rule": lim.rule,
            "largest_safe_lr": safe,
            "trial_steps": len(j.trial_losses),
            "trial_losses": list(j.trial_losses),
            "horizon_steps": j.horizon,
            "lr_factor": factor,
        },
        explanation=text,
        remedies=remedies,
        step=None,
    )
