"""The accepted remedies as a few lines of code the user can paste.

Each line is a remedy's ``Remedy.call`` (the catalog writes them), placed where
it belongs in an ordinary training script: model changes after the model is
built (``model = ...`` for surgery, which returns a new module), optimizer
changes after the optimizer is built, and clipping between ``loss.backward()``
and ``optimizer.step()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gradmedic.autorepair.appliers import applier_for, order
from gradmedic.findings import Remedy

# ``clipper = gradmedic.AutoClip(...)``: an object built once, before the loop
_CONSTRUCTS = re.compile(r"^\w+\s*=\s*gradmedic\.[A-Z]\w*\(")

_HEADERS = {
    "model": "# after building the model (before creating the optimizer):",
    "optimizer": "# the optimizer (create it after the model changes above):",
    "loop": "# in the training loop, between loss.backward() and optimizer.step():",
}


def snippet(remedies: Sequence[Remedy]) -> str:
    """Python lines applying ``remedies`` in a training script.

    Example:
        >>> from gradmedic.remedies import catalog
        >>> print(snippet([catalog.clip_norm(1.0), catalog.init_scheme("he")]))
        import gradmedic
        <BLANKLINE>
        # after building the model (before creating the optimizer):
        gradmedic.init.apply(model, 'he')
        <BLANKLINE>
        # in the training loop, between loss.backward() and optimizer.step():
        gradmedic.clip_grad_norm_(model.parameters(), max_norm=1)
    """
    if not remedies:
        return "# no repair needed"
    sections: dict[str, list[str]] = {"model": [], "optimizer": [], "setup": [], "loop": []}
    for remedy in order(remedies):
        applier = applier_for(remedy)
        for statement in _statements(remedy.call):
            if applier.where == "loop" and _CONSTRUCTS.match(statement):
                # an object the loop uses (e.g. an AutoClip instance) is created once, before
                sections["setup"].append(statement)
            elif applier.assigns and not statement.startswith("model ="):
                sections[applier.where].append(f"model = {statement}")
            else:
                sections[applier.where].append(statement)
    imports = ["import gradmedic"]
    body = "\n".join(sections["model"] + sections["optimizer"] + sections["setup"])
    if "nn." in body:
        imports.append("from torch import nn")
    if "torch." in body.replace("gradmedic.", ""):
        imports.append("import torch")
    blocks = ["\n".join(imports)]
    if sections["model"]:
        blocks.append("\n".join([_HEADERS["model"], *sections["model"]]))
    if sections["optimizer"] or sections["setup"]:
        lines = sections["optimizer"] + sections["setup"]
        blocks.append("\n".join([_HEADERS["optimizer"], *lines]))
    if sections["loop"]:
        blocks.append("\n".join([_HEADERS["loop"], *sections["loop"]]))
    return "\n\n".join(blocks)


def _statements(call: str) -> list[str]:
    """Split ``"a = f(); a(x)"`` into statements (a ``for ...:`` line stays whole)."""
    if call.lstrip().startswith("for "):
        return [call.strip()]
    return [part.strip() for part in call.split("; ") if part.strip()]
