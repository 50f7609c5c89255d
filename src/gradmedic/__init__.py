"""gradmedic: find, explain and fix vanishing and exploding gradients in PyTorch.

Example:
    >>> import torch, gradmedic
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradmedic.watch(model, opt) as monitor:
    ...     loss = model(torch.randn(16, 4)).pow(2).mean()
    ...     loss.backward()
    ...     opt.step()
    >>> sorted(monitor.grad_norms())
    ['0', '2']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradmedic.errors import GradmedicError
from gradmedic.findings import Diagnosis, Finding, Problem, Remedy, Severity
from gradmedic.version import __version__

# Public names loaded on first use, so `import gradmedic` costs torch and little else.
# "module:attribute" names an attribute; a bare "module" is the name itself.
_LAZY = {
    "watch": "gradmedic.monitor:watch",
    "Monitor": "gradmedic.monitor:Monitor",
    "check": "gradmedic.preflight:check",
    "theory": "gradmedic.theory",
    "clip_grad_norm_": "gradmedic.remedies.clipping:clip_grad_norm_",
    "clip_grad_value_": "gradmedic.remedies.clipping:clip_grad_value_",
    "AutoClip": "gradmedic.remedies.clipping:AutoClip",
    "AGC": "gradmedic.remedies.clipping:AGC",
    "ZClip": "gradmedic.remedies.clipping:ZClip",
    "init": "gradmedic.remedies.init",
    "surgery": "gradmedic.remedies.surgery",
    "add_weight_decay": "gradmedic.remedies.weight_decay:add_weight_decay",
    "repair": "gradmedic.autorepair:repair",
    "diagnose_rows": "gradmedic.diagnose:diagnose_rows",
    "load_history": "gradmedic.history:load_history",
}

__all__ = [
    "AGC",
    "AutoClip",
    "Diagnosis",
    "Finding",
    "GradmedicError",
    "Monitor",
    "Problem",
    "Remedy",
    "Severity",
    "ZClip",
    "__version__",
    "add_weight_decay",
    "check",
    "clip_grad_norm_",
    "clip_grad_value_",
    "diagnose_rows",
    "init",
    "load_history",
    "repair",
    "surgery",
    "theory",
    "watch",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'gradmedic' has no attribute {name!r}")
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from gradmedic import theory
    from gradmedic.autorepair import repair
    from gradmedic.diagnose import diagnose_rows
    from gradmedic.history import load_history
    from gradmedic.monitor import Monitor, watch
    from gradmedic.preflight import check
    from gradmedic.remedies import init, surgery
    from gradmedic.remedies.clipping import AGC, AutoClip, ZClip, clip_grad_norm_, clip_grad_value_
    from gradmedic.remedies.weight_decay import add_weight_decay
