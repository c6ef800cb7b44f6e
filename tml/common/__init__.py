"""Mechanisms shared by every project: launching, devices, sharding, batches, checkpoints."""
