"""Prefect flows and the `abloop` command: thin compositions of store, retrieval, training and serving."""
