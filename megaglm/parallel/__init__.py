"""Parallel layout: validation, process-group initialization, batch splitting."""
