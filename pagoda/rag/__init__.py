"""Retrieval-augmented generation: loaders, splitter, embedder, vector store, hybrid retrieval."""
