"""Evaluations: passkey retrieval, per-position loss and state statistics, the hashed bag-of-words judge."""
