"""Data: DML datasets and class-disjoint splits, the standard benchmarks, the embedded glyphs and emoji, robust image
decoding, transforms and the P×K sampler (imports nothing of the package but ``modeling`` and ``utils``)."""
