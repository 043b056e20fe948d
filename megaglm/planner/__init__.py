"""``megaglm-plan``: choose a TP / PP / VPP / CP / DP layout, recompute and optimizer sharding for a model,
sequence, batch and GPU count, from estimated per-GPU memory and step time.

Modules: :mod:`.presets` (model presets), :mod:`.parameters` (weights / grads / optimizer bytes per rank,
exact), :mod:`.activations` (activation memory), :mod:`.hardware` (GPU table), :mod:`.step_time` (time
model), :mod:`.candidates` (enumeration and checks), :mod:`.report` (text and overrides), :mod:`.cli`.
Only the CLI and the tests import this package.
"""
