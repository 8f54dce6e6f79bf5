"""The partitioner: box profiles, the cost model, the solver, its baselines and its words."""
