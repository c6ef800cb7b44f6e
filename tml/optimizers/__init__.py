"""Optimizer and learning-rate schedule configuration, and the objects built from it."""
