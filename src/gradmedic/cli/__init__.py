"""The ``gradmedic`` command line: one small module per command."""
