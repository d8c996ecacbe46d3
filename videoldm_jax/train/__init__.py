"""Training engine: checkpointing, preemption handling, the train loop."""
