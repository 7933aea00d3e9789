"""OpenAI-compatible HTTP serving of a BlockEngine (the ``serve`` extra: FastAPI + uvicorn).

    from blockrag.serve import ServeConfig, create_app
    app = create_app(engine, ServeConfig(model_id="my-model"))

Command line: ``blockrag serve --help``. Importing this package needs no extra; ``create_app`` does.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        try:
            from blockrag.serve import app
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"{e}; the server needs the serve extra: pip install 'blockrag[serve]'",
                                      name=e.name) from e
        return getattr(app, name)
    raise AttributeError(f"module 'blockrag.serve' has no attribute {name!r}")
