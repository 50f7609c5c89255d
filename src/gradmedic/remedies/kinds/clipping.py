"""Remedies that bound the gradient before each step (claim R7): they run in the loop."""

from __future__ import annotations

from gradmedic.findings import Remedy
from gradmedic.remedies.base import RemedyKind


class ClipNorm(RemedyKind):
    """Clip the global gradient norm before each optimizer step (``clip_norm``)."""

    name, stage, group, where = "clip_norm", 13, "clip", "loop"
    setting, default_args = ("clip_norm", "max_norm"), ((1.0,),)
    summary = "clip the global gradient norm before each step"
    text = "Clip the global gradient norm at {max_norm:.3g} before each step"
    call = "gradmedic.clip_grad_norm_(model.parameters(), max_norm={max_norm:.3g})"

    def remedy(self, max_norm: float, why: str = "") -> Remedy:
        """Clip the global gradient norm before each optimizer step."""
        return self.make(why, max_norm=float(max_norm))


class ClipValue(RemedyKind):
    """Clip every gradient element to ``[-v, v]`` (``clip_value``)."""

    name, stage, group, where = "clip_value", 13, "clip", "loop"
    setting, default_args = ("clip_value", "clip_value"), ((1.0,),)
    summary = "clip each gradient element to [-v, v]"
    text = "Clip each gradient element to [-{clip_value:.3g}, {clip_value:.3g}]"
    call = "gradmedic.clip_grad_value_(model.parameters(), clip_value={clip_value:.3g})"

    def remedy(self, clip_value: float, why: str = "") -> Remedy:
        """Clip every gradient element to [-clip_value, clip_value]."""
        return self.make(why, clip_value=float(clip_value))


class AutoClipKind(RemedyKind):
    """Adaptive clipping at a percentile of past gradient norms (``autoclip``)."""

    name, stage, group, where = "autoclip", 13, "clip", "loop"
    setting, default_args = ("autoclip", "percentile"), ((10.0,),)
    summary = "clip at a percentile of the gradient norms seen so far (AutoClip)"
    text = "Adaptive clipping at the {percentile:g}th percentile of past gradient norms"
    call = "clipper = gradmedic.AutoClip(percentile={percentile:g}); clipper(model.parameters())"

    def remedy(self, percentile: float = 10.0, why: str = "") -> Remedy:
        """Adaptive clipping at a percentile of the observed gradient norms."""
        return self.make(why, percentile=float(percentile))

    def lines(self, remedy: Remedy) -> list[tuple[str, str]]:
        """The clipper is built once, before the loop; it is called in the loop."""
        build, *calls = (statement for _, statement in super().lines(remedy))
        return [("setup", build), *(("loop", c) for c in calls)]
