"""fusec: a compiler-centric LLM inference engine."""
__version__ = "0.1.0"
