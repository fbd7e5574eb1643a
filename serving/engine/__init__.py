"""Attention/KV engine: scheduler, KV pages, expert transport."""
