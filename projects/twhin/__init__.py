"""TwHIN: heterogeneous-graph entity embeddings (El-Kishky et al., KDD 2022) on TorchRec."""
