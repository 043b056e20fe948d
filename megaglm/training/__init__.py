"""Training glue around megatron-core: batches, loss, optimizer, checkpoints, logging, the loop."""
