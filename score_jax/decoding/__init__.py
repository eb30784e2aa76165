"""Decoding: the multi-attempt sampler (one compiled program), sampling methods, the generate
CLI."""
