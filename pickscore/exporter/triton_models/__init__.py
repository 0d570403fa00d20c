"""model.py files of the Triton repository's Python-backend steps (run inside Triton, not imported here)."""
