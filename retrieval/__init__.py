"""Retrieval: embedding index (exact or faiss), calibration, gallery embedding, search, the pipeline, Hub sharing."""
