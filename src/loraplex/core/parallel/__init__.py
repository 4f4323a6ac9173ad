"""Tensor parallelism: one model over several devices (or CPU processes) of one host."""
