"""Evaluation: logits through any layout, per-length perplexity, retrieval probes."""
