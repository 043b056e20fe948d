"""Launchers: local (torchrun) and Ray."""
