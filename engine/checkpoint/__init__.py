"""The state of a run in progress: resumable checkpoints with manifests (store.py), what every recipe does with
them (resume.py) and stop requests (signals.py)."""
