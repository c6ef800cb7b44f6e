"""`python -m benchmarks.peers`: see benchmarks/peers/compare.py."""

from benchmarks.peers.compare import main

main()
