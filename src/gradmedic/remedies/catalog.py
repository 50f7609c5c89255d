"""The remedy vocabulary: one constructor per cure, naming the call that applies it.

Detectors build their ranked remedy lists from these, so every Finding names a
real gradmedic call with arguments that fit the model at hand, and the repair
search (:mod:`gradmedic.autorepair`) can map ``Remedy.name`` back to code.

Every ``Remedy.call`` runs as pasted into an ordinary training script (names
``model``, ``optimizer``, ``batch``, ``torch``, ``nn``, ``gradmedic`` in scope):
calls that return a new model rebind it (``model = gradmedic.surgery...``), and
remedies for a loop without an optimizer name the loop's own learning rate.
"""

from __future__ import annotations

from gradmedic.findings import Remedy


def init_scheme(scheme: str, why: str = "") -> Remedy:
    """Re-initialize weights with ``scheme`` ('he', 'xavier', 'orthogonal', 'lecun', 'lsuv')."""
    call = (
        "gradmedic.init.apply(model, 'lsuv', data=batch)"
        if scheme == "lsuv"
        else f"gradmedic.init.apply(model, {scheme!r})"
    )
    text = {
        "he": "He (Kaiming) initialization: variance 2/fan_in keeps ReLU signals at constant size",
        "xavier": "Xavier (Glorot) initialization: variance 2/(fan_in+fan_out), for tanh",
        "orthogonal": "Orthogonal initialization: singular values 1, the Jacobian preserves norms",
        "lecun": "LeCun initialization: variance 1/fan_in",
        "lsuv": "LSUV: data-driven init scaling each layer until its output variance is 1",
    }.get(scheme, f"{scheme} initialization")
    return Remedy(f"{scheme}_init", _join(text, why), call, {"scheme": scheme})


def swap_activation(old: str, new: str, why: str = "") -> Remedy:
    """Replace activation modules ``old`` by ``new`` (class names in ``torch.nn``)."""
    return Remedy(
        f"swap_{new.lower()}",
        _join(f"Replace {old} by {new}", why),
        f"model = gradmedic.surgery.swap_activations(model, {{nn.{old}: nn.{new}}})",
        {"mapping": {old: new}},
    )


def normalization(kind: str = "batch", why: str = "") -> Remedy:
    """Insert BatchNorm/LayerNorm after each Linear/Conv."""
    return Remedy(
        f"{kind}_norm",
        _join(f"Insert {kind} normalization after each Linear/Conv layer", why),
        f"model = gradmedic.surgery.add_normalization(model, kind={kind!r})",
        {"kind": kind},
    )


def residual(why: str = "") -> Remedy:
    """Wrap shape-preserving blocks in identity skip connections."""
    return Remedy(
        "residual",
        _join("Add residual (identity) connections around shape-preserving blocks", why),
        "model = gradmedic.surgery.residualize(model)",
        {},
    )


def clip_norm(max_norm: float, why: str = "") -> Remedy:
    """Clip the global gradient norm before each optimizer step."""
    return Remedy(
        "clip_norm",
        _join(f"Clip the global gradient norm at {max_norm:.3g} before each step", why),
        f"gradmedic.clip_grad_norm_(model.parameters(), max_norm={max_norm:.3g})",
        {"max_norm": float(max_norm)},
    )


def clip_value(clip_value: float, why: str = "") -> Remedy:
    """Clip every gradient element to [-clip_value, clip_value]."""
    return Remedy(
        "clip_value",
        _join(f"Clip each gradient element to [-{clip_value:.3g}, {clip_value:.3g}]", why),
        f"gradmedic.clip_grad_value_(model.parameters(), clip_value={clip_value:.3g})",
        {"clip_value": float(clip_value)},
    )


def autoclip(percentile: float = 10.0, why: str = "") -> Remedy:
    """Adaptive clipping at a percentile of the observed gradient norms."""
    return Remedy(
        "autoclip",
        _join(f"Adaptive clipping at the {percentile:g}th percentile of past gradient norms", why),
        f"clipper = gradmedic.AutoClip(percentile={percentile:g}); clipper(model.parameters())",
        {"percentile": float(percentile)},
    )


def lower_lr(
    factor: float = 0.1,
    why: str = "",
    *,
    optimizer: bool = True,
    lr: list[float] | None = None,
) -> Remedy:
    """Scale the learning rate by ``factor``.

    Args:
        factor: The factor.
        why: The reason.
        optimizer: False for a loop without an optimizer: the call then scales
            the loop's own ``lr`` variable.
        lr: The current learning rate(s), to name the new value.
    """
    target = ""
    if lr:
        new = sorted({v * factor for v in lr})
        target = f" (to {', '.join(f'{v:.3g}' for v in new)})"
    params: dict[str, object] = {"factor": float(factor)}
    if lr:
        params["lr"] = [v * factor for v in lr]
    if optimizer:
        text = f"Lower the learning rate {1 / factor:.3g}x{target}"
        call = f"for g in optimizer.param_groups: g['lr'] *= {factor:g}"
    else:
        text = (
            f"Lower the learning rate {1 / factor:.3g}x{target} (no optimizer was given to the "
            "monitor: scale the lr your update uses)"
        )
        call = f"lr = lr * {factor:g}  # the lr of your update, e.g. p -= lr * p.grad"
    return Remedy("lower_lr", _join(text, why), call, params)


def raise_lr(factor: float, why: str = "", *, lr: list[float] | None = None) -> Remedy:
    """Scale the learning rate up by ``factor`` (> 1): steps too small to learn in.

    Args:
        factor: The factor (> 1).
        why: The reason.
        lr: The current learning rate(s), to name the new value.
    """
    target = ""
    params: dict[str, object] = {"factor": float(factor)}
    if lr:
        new = sorted({v * factor for v in lr})
        target = f" (to {', '.join(f'{v:.3g}' for v in new)})"
        params["lr"] = [v * factor for v in lr]
    return Remedy(
        "raise_lr",
        _join(f"Raise the learning rate {factor:.3g}x{target}", why),
        f"for g in optimizer.param_groups: g['lr'] *= {factor:g}",
        params,
    )


def warmup(start_factor: float, steps: int, why: str = "", *, optimizer: bool = True) -> Remedy:
    """Ramp the learning rate linearly from ``start_factor * lr`` to ``lr`` over ``steps``."""
    text = f"Warm the learning rate up from {start_factor:g}x to 1x over {steps} steps"
    if optimizer:
        call = (
            "scheduler = torch.optim.lr_scheduler.LinearLR("
            f"optimizer, start_factor={start_factor:g}, total_iters={steps})"
            "  # and scheduler.step() after each optimizer.step()"
        )
    else:
        call = (
            f"lr_now = lr * min(1.0, {start_factor:g} + (1 - {start_factor:g}) * step / {steps})"
            "  # use lr_now in your update at each step"
        )
    return Remedy(
        "warmup",
        _join(text, why),
        call,
        {"start_factor": float(start_factor), "steps": int(steps)},
    )


def adaptive_optimizer(why: str = "", *, current: str | None = None) -> Remedy:
    """Switch to Adam, whose per-parameter step size adapts to the gradient scale.

    ``current`` names the optimizer (or ``"none"`` for a manual loop) it replaces.
    """
    instead = ""
    if current == "none":
        instead = " instead of the manual update (then call optimizer.step())"
    elif current:
        instead = f" instead of {current}"
    return Remedy(
        "adaptive_optimizer",
        _join(f"Use an adaptive optimizer (Adam, lr=1e-3){instead}", why),
        "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
        {"optimizer": "Adam", "lr": 1e-3},
    )


def weight_decay(amount: float = 1e-4, why: str = "") -> Remedy:
    """Add L2 weight decay to the optimizer's weight parameters."""
    return Remedy(
        "weight_decay",
        _join(f"Add L2 weight decay {amount:g} (norms and biases excluded)", why),
        f"gradmedic.add_weight_decay(optimizer, model, weight_decay={amount:g})",
        {"weight_decay": float(amount)},
    )


def gate_recurrent(kind: str = "lstm", why: str = "") -> Remedy:
    """Replace nn.RNN by a gated cell (LSTM/GRU) of the same sizes."""
    return Remedy(
        f"gate_{kind}",
        _join(f"Replace nn.RNN by nn.{kind.upper()} of the same sizes", why),
        f"model = gradmedic.surgery.gate_recurrent(model, {kind!r})",
        {"kind": kind},
    )


def forget_bias(value: float = 1.0, why: str = "") -> Remedy:
    """Set the LSTM forget-gate bias so the cell keeps its state by default."""
    return Remedy(
        "forget_bias",
        _join(f"Set the LSTM forget-gate bias to {value:g} (forget gate near 1)", why),
        f"gradmedic.init.forget_gate_bias_(model, {value:g})",
        {"value": float(value)},
    )


def bias_reinit(value: float = 0.01, why: str = "") -> Remedy:
    """Reset the biases of layers feeding dead units to a small positive value."""
    return Remedy(
        "bias_reinit",
        _join(f"Re-initialize the biases feeding dead units to {value:g}", why),
        f"gradmedic.init.apply(model, 'bias', value={value:g})",
        {"value": float(value)},
    )


def truncate_bptt(steps: int, why: str = "") -> Remedy:
    """Backpropagate through at most ``steps`` time steps."""
    return Remedy(
        "truncate_bptt",
        _join(
            f"Truncate backpropagation through time to {steps} steps (detach the hidden state)", why
        ),
        f"h = h.detach()  # every {steps} steps",
        {"steps": int(steps)},
    )


def _join(text: str, why: str) -> str:
    return f"{text}: {why}" if why else text
