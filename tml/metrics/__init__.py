"""Losses and metrics every project can use, correct across workers.

`losses`: (multi-task) binary cross-entropy with example and positive weights.
`stable_mean`: a weighted mean that stays exact in float32 over billions of values and
merges across workers. `rce`: relative cross-entropy (RCE) and its normalised form (NRCE),
as in the original tml's `metrics/rce.py`. `evaluation`: the held-out evaluation loop
(AUROC from torchmetrics, RCE, NRCE, the loss) run on every rank. `ranking`: MRR, Hits@k
and the mean rank of 1-based ranks. `reduce`: the global mean
of a value over workers (what the training log shows as the loss).

Metrics are torchmetrics `Metric`s: each rank updates its own state and `compute()`
gathers the states of all ranks (a collective: every rank must call it).
"""
