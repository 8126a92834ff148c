"""Energy: pure computation (counter deltas, attribution, models, the optimiser). No I/O."""
