"""Compliance reports: ``report.json`` built from a run directory's evidence, rendered to HTML and PDF."""
