"""Core pieces shared by every project: configuration, training loop."""
