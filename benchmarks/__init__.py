"""One module per question, each run as `python -m benchmarks.NAME` (README.md here); kit.py and timing.py are
what they share."""
