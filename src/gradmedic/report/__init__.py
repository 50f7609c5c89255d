"""Showing a diagnosis: the rich terminal view (``terminal``) and the HTML report."""
