"""The OpenAI-compatible HTTP server (`fusec serve`)."""
