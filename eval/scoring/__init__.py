"""Benchmark scoring, independent of any model: the official rules, re-implemented and tested."""
