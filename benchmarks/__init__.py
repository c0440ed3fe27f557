"""fusedoptim's benchmark harness: every optimizer and backend against torch.optim.AdamW and the peers.

``python -m benchmarks --help``; ``benchmarks/README.md`` describes what is measured and how.
"""
