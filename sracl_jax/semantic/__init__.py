"""SRA-CL semantic stage: text embeddings, LLM summaries and semantic retrieval.

Import the submodules directly (e.g. `from sracl_jax.semantic import text_encoder`): they have
different optional dependencies, so this package imports none of them.
"""
