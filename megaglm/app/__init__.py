"""The application layer: compose a run config, check it once (pre-flight) into a frozen run plan,
and run it (:mod:`megaglm.app.run`); the stage chain and checkpoint evaluation on the same path.
Entry points (``megaglm-train``, the Ray launcher, ``megaglm-eval``, the checkpoint tools) sit above it."""
