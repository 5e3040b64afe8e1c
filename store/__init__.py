"""The shared store: settings, schema, queries and the batching writer.

Importing this package never pulls in torch, faiss or FastAPI.
"""
