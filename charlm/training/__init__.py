"""Training: the loop, its schedule, processes (torchrun), and the run directory it owns."""
