"""coserve: co-locate a generative LLM and an embedding model on the same GPUs and measure
the cost."""

__version__ = "0.1.0"
