"""The two servers a condition can run, by role: `gen` (a generative LLM behind
/v1/completions and /v1/chat/completions) and `embed` (an embedding model behind
/v1/embeddings). Every layer that names a role takes it from here."""

ROLES: tuple[str, ...] = ("gen", "embed")
