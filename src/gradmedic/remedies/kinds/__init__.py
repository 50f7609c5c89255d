"""The remedy kinds, one file per family; :mod:`gradmedic.remedies.registry` lists them.

A family shares what its kinds act on (the model's structure, its initial weights,
the optimizer, the gradients, the recurrence), so a kind's file reads next to its
siblings; each kind is one small :class:`~gradmedic.remedies.base.RemedyKind`.
"""
