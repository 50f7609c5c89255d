"""Glue for training frameworks, imported only when used.

- :mod:`gradmedic.integrations.lightning`: ``GradmedicCallback`` for Lightning.
- :mod:`gradmedic.integrations.transformers`: ``GradmedicTrainerCallback`` for the
  Hugging Face ``Trainer``.
"""
