"""A tiny project made by following docs/adding_a_project.md step by step (the doc's code
blocks leave the model and the dataset to the reader; they are filled in here, in the
layout the doc gives). Users and items in planted communities; a pair is positive when both
are in the same community. tests/tml/trainer/test_adding_a_project.py trains it."""
