"""What a finished run leaves: its folder (run_folder.py: every path of a run, made whole or not at all by
export.py), Hugging Face exports with model cards (export.py), receipts (receipt.py), hub uploads (hub.py) and
GGUF conversions (gguf.py)."""
