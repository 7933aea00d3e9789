"""Names shared by the LangChain components.

Engines named by `model=` are shared per process through `BlockEngine.shared`; streams are iterated
asynchronously through `blockrag.aio.iterate_in_thread`.
"""

BLOCK_KEY = "block_key"
"""Metadata / content-block `extras` key that carries the content key of a passage's cached KV block."""
