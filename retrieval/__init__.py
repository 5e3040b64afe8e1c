"""Embedding, chunking, FAISS index build / persist / load / search, and HTML -> text ingestion.

Submodules import their heavy dependencies (torch, sentence-transformers, faiss, trafilatura)
lazily, so importing this package is cheap.
"""
