"""Committing results: whole run folders and Hugging Face checkpoints appear complete or not at all."""
