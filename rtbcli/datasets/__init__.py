"""Benchmark distributions with exactly known quantities (log Z, mode masses, exact samples)."""
