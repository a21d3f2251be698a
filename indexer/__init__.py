"""clipsearch indexer: offline reader -> embedder -> writer -> FAISS build -> published index."""
