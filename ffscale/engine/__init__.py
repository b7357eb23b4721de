"""DeepSpeed only: the engine, its config, checkpoints, distribution, the optimizer, the EMA, and
the preemption flag the engine folds into its one collective per step."""
