"""`coserve export`: a condition of a spec or run folder as a deployment (Docker Compose,
Kubernetes, or plain shell commands). model.py reads the condition; compose.py, k8s.py and
commands.py write it; command.py is the CLI."""
