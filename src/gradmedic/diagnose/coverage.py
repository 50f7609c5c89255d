"""What a diagnosis had to go on: records, record keys, problems not checked, and why.

A diagnosis without records is not healthy: nothing was looked at. The warning
names the likely cause from what the context knows (no monitored layer, no
optimizer, every step skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.episodes import row_step
from gradmedic.diagnose.registry import NEEDS
from gradmedic.diagnose.signals import _num, existing_clip, zero_started
from gradmedic.findings import Coverage, Problem
from gradmedic.report.summary import elided

Rows = Sequence[Mapping[str, Any]]

# keys whose None value means "measured, nothing found" (a finite step)
_NONE_IS_DATA = frozenset({"nonfinite_origin"})


def key_counts(rows: Rows) -> dict[str, int]:
    """Record key -> number of records holding a value for it (``step`` left out)."""
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step":
                continue
            if value is None and key not in _NONE_IS_DATA:
                continue
            if isinstance(value, Mapping | list | tuple) and not value:
                continue
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: Record keys of the backward pass through the layers.
_BACKWARD_KEYS = ("delta_norm", "recurrent")
_NO_GRADIENT = (
    "no record holds a gradient: no backward pass reached a monitored parameter or layer "
    "before any record"
)
_GRADIENT_CLEARED = "no parameter held a nonzero gradient at any record"


def _no_gradient(rows: Rows, keys: Mapping[str, int]) -> str | None:
    """Why the records hold no gradient to diagnose (None: they hold one).

    Every gradient exactly 0 at every record, or none at all while parameters did
    not change, is a loop that clears the gradients before the step (``zero_grad()``
    between backward and step). Layer deltas without weight gradients while
    parameters change are a functional loop (``torch.autograd.grad`` and a
    hand-written update): diagnosed from the deltas.
    """
    norms = [_num(v) for r in rows for v in (r.get("grad_norm") or {}).values()]
    if norms:
        return _GRADIENT_CLEARED if all(v == 0.0 for v in norms) else None
    if keys.get("global_grad_norm"):
        return None
    if not any(keys.get(k) for k in _BACKWARD_KEYS):
        return _NO_GRADIENT
    ratios = [_num(v) for r in rows for v in (r.get("update_ratio") or {}).values()]
    if ratios and all(v == 0.0 for v in ratios):
        return _GRADIENT_CLEARED
    return None


def _monitor(context: Mapping[str, Any]) -> Mapping[str, Any]:
    """The live monitor's own counts (``Monitor.coverage()``), or {} for rows alone."""
    found = context.get("monitor")
    return found if isinstance(found, Mapping) else {}


def _gradients_expected(context: Mapping[str, Any]) -> bool:
    """Whether the rows come from a live monitor that reads gradients at every record."""
    return "gradients" in (_monitor(context).get("probes") or ())


def coverage(rows: Rows, skipped: int, context: Mapping[str, Any]) -> Coverage:
    """The :class:`~gradmedic.findings.Coverage` of ``rows``."""
    keys = key_counts(rows)
    structure = context.get("structure") or {}
    not_checked: dict[str, str] = {}
    for problem, needs in NEEDS.items():
        if any(keys.get(k) for k in needs.keys):
            continue
        if needs.keys == ("recurrent",) and "recurrent" in structure and not structure["recurrent"]:
            continue  # no recurrent module: nothing to check over time
        not_checked[problem.value] = needs.why
        if needs.keys == ("recurrent",) and context.get("packed_recurrent"):
            not_checked[problem.value] = _PACKED.format(
                ", ".join(repr(n) for n in context["packed_recurrent"])
            )
    notes: list[str] = []
    losses = [v for r in rows if (v := _num(r.get("loss"))) is not None]
    if losses and min(losses) <= 0 and Problem.DIVERGENCE.value not in not_checked:
        not_checked[Problem.DIVERGENCE.value] = (
            "the loss takes values <= 0: the several-fold rise rule needs a positive loss"
        )
    zero = zero_started(rows)
    if zero:
        first = {name: row_step(rows[i], i) for name, i in zero.items()}
        listed = ", ".join(f"{n} (step {s})" for n, s in list(first.items())[:6])
        notes.append(
            f"Update ratios of zero-initialized layers are not judged: {listed}"
            f"{' ...' if len(first) > 6 else ''} had param_norm 0 at an update, where "
            "||dw||/||w|| is a division by zero, and a parameter grown from 0 has a ratio ~1/k "
            "after k steps whatever the learning rate."
        )
    clip = existing_clip(rows)
    if clip is not None:
        notes.append(f"The run clips the global gradient norm at {clip:.3g}.")
    steps = [row_step(r, i) for i, r in enumerate(rows)]
    layers = context.get("layers")
    if layers is not None and not list(layers):
        not_checked = {p.value: "the model has no monitored layer" for p in NEEDS}
    elif rows and _gradients_expected(context) and (why := _no_gradient(rows, keys)):
        not_checked = {p.value: why for p in NEEDS}
    checked = tuple(p.value for p in NEEDS if p.value not in not_checked) if rows else ()
    return Coverage(
        checked=checked,
        steps=len(rows),
        first_step=steps[0] if steps else None,
        last_step=steps[-1] if steps else None,
        skipped=skipped,
        keys=keys,
        not_checked=not_checked,
        notes=tuple(notes),
        unreached=_unreached(rows, context, keys),
    )


_RECORDS_AT_STEP = (
    "This monitor has no optimizer, so it records at monitor.step(): call "
    "monitor.step(loss=loss) after each loss.backward() (or pass the optimizer to watch())."
)


#: Why the gradient through time was not checked when the recurrent modules ran on packed input.
_PACKED = (
    "{} ran on a PackedSequence, whose per-step gradient gradmedic does not measure: the "
    "gradient through time was not checked (a padded tensor batch instead is measured)"
)

#: Records before layers that never got a gradient are called out (a run, not one step).
_UNREACHED_RECORDS = 3


def _unreached(rows: Rows, context: Mapping[str, Any], keys: Mapping[str, int]) -> tuple[str, ...]:
    """Trainable layers no record holds a gradient for, if more than half of them.

    Judged only from a live monitor's context (``context["trainable_layers"]``: layers
    with a parameter that requires grad now, so frozen ones are left out) whose
    records are every step it saw (no ``every`` schedule, no record dropped from the
    history), after a few records: one such layer is cut off from the loss. An unused
    head (a pooler) is normal, so only a model mostly cut off is called out.
    """
    names = context.get("trainable_layers")
    monitor = _monitor(context)
    whole = monitor.get("steps_seen") == monitor.get("records") == len(rows)
    if not names or not whole or len(rows) < _UNREACHED_RECORDS or not keys.get("grad_norm"):
        return ()
    reached = {name for row in rows for name in row.get("grad_norm") or ()}
    missing = tuple(n for n in names if n not in reached)
    return missing if 2 * len(missing) > len(names) else ()


def _never_reached(cov: Coverage, context: Mapping[str, Any]) -> str:
    missing = cov.unreached
    total = len(context.get("trainable_layers") or missing)
    return (
        f"{len(missing)} of {total} trainable layers never received a gradient in "
        f"{cov.steps} records ({elided(missing)}): their parameters require grad, but no "
        "backward pass reached them, so they do not train. Look for a .detach() or "
        "torch.no_grad() in the forward, torch.utils.checkpoint(use_reentrant=True) on inputs "
        "that do not require grad (pass use_reentrant=False), or modules whose outputs the "
        "loss does not use."
    )


def warnings_for(cov: Coverage, context: Mapping[str, Any]) -> list[str]:
    """Sentences about the diagnosis itself: why nothing could be, or what it could not reach.

    Uses what the context knows: the monitored layers (``context["layers"]``),
    the optimizer (``context["optimizer"]``, None for a loop without one) and the
    monitor's own counts (``context["monitor"] = {"steps_seen", "records",
    "skipped_steps", "optimizer", ...}``, as ``Monitor.coverage()`` gives them).
    """
    layers = context.get("layers")
    monitor = _monitor(context)
    no_layers = layers is not None and not list(layers)
    if no_layers:
        return [
            "Nothing to diagnose: the model has no parameter that requires grad, so no layer "
            "is monitored (is it frozen, or are its tensors plain attributes instead of "
            "nn.Parameter?)."
        ]
    if cov.steps == 0:
        has_opt = monitor.get("optimizer")
        if has_opt is None and "optimizer" in context:
            has_opt = context["optimizer"] is not None
        unstepped = monitor.get("unstepped_backwards")
        if (cov.skipped or (isinstance(unstepped, int) and unstepped > 0)) and has_opt is False:
            return [
                "Nothing to diagnose: backward passes ran but monitor.step() was never "
                f"called. {_RECORDS_AT_STEP}"
            ]
        if cov.skipped:
            return [
                f"Nothing to diagnose: all {cov.skipped} recorded iteration(s) were skipped "
                "(the optimizer step did not run: a GradScaler found inf/NaN every time)."
            ]
        seen = monitor.get("steps_seen")
        if isinstance(seen, int) and seen > 0:
            return [
                f"Nothing to diagnose: the monitor saw {seen} step(s) but recorded none "
                "(its `every` schedule skipped them all)."
            ]
        if has_opt is False:
            return [f"Nothing to diagnose: no step was recorded. {_RECORDS_AT_STEP}"]
        if has_opt is True:
            return [
                "Nothing to diagnose: no step was recorded. The monitor records at "
                "optimizer.step(), which never ran while it was active (was the loop inside "
                "the `with gradmedic.watch(...)` block, with the optimizer given to watch()?)."
            ]
        return [
            "Nothing to diagnose: no step was recorded. Without an optimizer the monitor "
            "records at monitor.step(): call it after each loss.backward(); with one, records "
            "are taken at optimizer.step() (was it called under the monitor?)."
        ]
    if cov.unreached:
        return [_never_reached(cov, context)]
    why = set(cov.not_checked.values())
    if cov.checked is not None and not cov.checked and why & {_NO_GRADIENT, _GRADIENT_CLEARED}:
        at = "monitor.step()" if monitor.get("optimizer") is False else "optimizer.step()"
        if _GRADIENT_CLEARED in why:
            return [
                f"Nothing to diagnose: backward passes ran, but at none of the {cov.steps} "
                f"record(s) did a monitored parameter hold a nonzero gradient: is "
                f"zero_grad() called between loss.backward() and {at}? Call it before "
                "loss.backward()."
            ]
        return [
            f"Nothing to diagnose: {cov.steps} record(s), and at none of them did a monitored "
            f"parameter have a gradient: call loss.backward() before {at} (an update or a "
            "forward pass alone has nothing to measure)."
        ]
    if cov.checked is not None and not cov.checked:
        return [
            f"Nothing to diagnose: {cov.steps} record(s) but none holds a gradient statistic, "
            "a loss or an update ratio (no parameter received a gradient, or every probe is off)."
        ]
    packed = [
        why for p, why in cov.not_checked.items() if p.endswith("_in_time") and "Packed" in why
    ]
    if packed:
        return [f"Not checked: {packed[0]}."]
    unwatched = list(monitor.get("unwatched_params") or ())
    if unwatched:
        return [
            f"{len(unwatched)} parameter(s) the optimizer steps were added after watch() "
            f"({elided(unwatched)}) and are not watched: this diagnosis does not cover them "
            "(close() the monitor and watch() the model again)."
        ]
    return []
