"""Reader processes that serve the training data to the trainers (the original's reader role).

Why: reading parquet, validating it and building the batches costs the trainer's CPU, which
on GPU hosts is the scarce part. A reader process (`tml.readers.server`) does that work and
streams the finished batches over Arrow Flight; a trainer (`tml.readers.client`) pulls them
from its readers in round robin and gets exactly the batches, in exactly the order, that
reading in-process would give it (same shares, same resume positions).

* `shares`: which reader serves which part of which trainer's data (disjoint, arithmetic);
* `codec`: a `DataclassBatch` of tensors / KeyedJaggedTensors as one Arrow record batch;
* `server`: the Flight server around a project's dataset factory; tickets are validated data;
* `client`: `ReaderDataset`, a drop-in for the in-process dataset (len, state, iteration);
* `roles`: who is a reader, where the readers are (env, SLURM, machines file, config), and
  starting local readers beside the trainers.

tml never imports a project: a project hands in its dataset factory and its batch class.
"""
