"""HTTP API and persistence. Never imports torch."""
