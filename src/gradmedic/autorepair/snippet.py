"""The accepted remedies as a few lines of code the user can paste.

Each line is a remedy's ``Remedy.call`` (the catalog writes them), placed where
its kind (:meth:`gradmedic.remedies.base.RemedyKind.lines`) says it belongs in an
ordinary training script: model changes after the model is built (``model = ...``
for surgery, which returns a new module), optimizer changes after the optimizer is
built, objects the loop uses before it, and clipping between ``loss.backward()``
and ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradmedic.autorepair.appliers import order
from gradmedic.findings import Remedy
from gradmedic.remedies.base import SECTIONS
from gradmedic.remedies.registry import kind_of

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
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for remedy in order(remedies):
        for where, statement in kind_of(remedy).lines(remedy):
            sections[where].append(statement)
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
