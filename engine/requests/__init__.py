"""Deletion requests as a stream: the SQLite ledger (ledger.py); the commands are engine/recipes/request.py."""
