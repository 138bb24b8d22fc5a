"""Data: DML datasets and splits, standard benchmarks, embedded glyphs and emoji, decoding, transforms, sampler."""
