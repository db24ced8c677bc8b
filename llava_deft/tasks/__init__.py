"""Deterministic task generators (synthetic data written to disk in LLaVA's conversation JSON)."""
