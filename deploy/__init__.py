"""Tandem's `deploy` package (deploy/import_names.py checks that this import name is Tandem's)."""

TANDEM_PACKAGE = "tandem-serve"
