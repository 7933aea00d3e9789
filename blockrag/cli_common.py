"""What the command line and its subcommands share: the engine a command runs with.

``blockrag.cli`` and the subcommand modules (``eval``, ``serve``, ...) import this, not each other.
"""

from __future__ import annotations

import sys

from blockrag.models import DEFAULT_MODEL, TINY_NOTE, is_tiny


def load_engine(model: str | None = None, *, template: str | None = None, device: str | None = None,
                dtype: str = "auto", token_budget: int = 8192, quiet: bool = False, progress: bool = False,
                cuda_graphs: int | None = None):
    """A BlockEngine for any name ``blockrag.models`` resolves (default: the embedded model); ``cuda_graphs``: see
    ``BlockEngine``."""
    from blockrag.engine import BlockEngine
    from blockrag.models import load

    model = model or DEFAULT_MODEL
    if is_tiny(model) and not quiet:
        print(TINY_NOTE.format(name=model), file=sys.stderr)
    loaded = load(model, device=device, dtype=dtype, progress=progress)
    return BlockEngine(loaded.model, loaded.tokenizer, template=template or loaded.template or "chat",
                       token_budget=token_budget, cuda_graphs=cuda_graphs)
