"""The maths on tensors: model outputs, prompt tokens, gradients, matching, projection, ADMM.

Nothing here reads files, data sets or private data (``pyproject.toml``, ``[tool.importlinter]``).
"""
