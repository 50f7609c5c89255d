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

__version__ = "0.1.0"

# Public names loaded on first use, so `import gradmedic` costs torch and little else.
_LAZY = {
    "watch": "gradmedic.monitor",
    "Monitor": "gradmedic.monitor",
    "check": "gradmedic.check",
    "theory": "gradmedic.theory",
    "clip_grad_norm_": "gradmedic.remedies.clipping",
    "clip_grad_value_": "gradmedic.remedies.clipping",
    "AutoClip": "gradmedic.remedies.clipping",
    "AGC": "gradmedic.remedies.clipping",
    "ZClip": "gradmedic.remedies.clipping",
    "init": "gradmedic.remedies.init",
    "surgery": "gradmedic.remedies.surgery",
    "add_weight_decay": "gradmedic.remedies.weight_decay",
    "repair": "gradmedic.repair",
    "diagnose_rows": "gradmedic.diagnose",
    "load_history": "gradmedic.history",
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
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gradmedic' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.rsplit(".", 1)[-1] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from gradmedic import theory
    from gradmedic.check import check
    from gradmedic.diagnose import diagnose_rows
    from gradmedic.history import load_history
    from gradmedic.monitor import Monitor, watch
    from gradmedic.remedies import init, surgery
    from gradmedic.remedies.clipping import AGC, AutoClip, ZClip, clip_grad_norm_, clip_grad_value_
    from gradmedic.remedies.weight_decay import add_weight_decay
    from gradmedic.repair import repair
