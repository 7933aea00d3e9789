"""The models a knowledge base holds KV for: each keeps its own block keys and KV files.

A knowledge base is created with one model (the default: what the CLI loads when no ``--model`` is given).
Opening it with another model adds that model: its block keys are computed for every passage (tokenizing
only) and its blocks are encoded when first needed; the other models' KV stays, and ``gc`` keeps it. Only
``forget`` (explicit) drops a model, after which ``gc`` deletes its KV files.

The docstore's meta keys ``model``, ``fingerprint``, ``template``, ``template_version``, ``kv_dtype``
describe the default model (the manifest mirrors them).
"""

from __future__ import annotations

import logging
from typing import Any

from blockrag.engine import BlockEngine
from blockrag.errors import InvalidInputError, KVBlockMismatchError
from blockrag.index.docstore import Docstore, model_id
from blockrag.index.errors import KnowledgeBaseError
from blockrag.template import Passage

logger = logging.getLogger("blockrag.index")


def id_of(engine: BlockEngine) -> str:
    return model_id(engine.fingerprint, engine.template.version)


def describe(engine: BlockEngine, name: str | None, template: str | None = None) -> dict[str, str]:
    """What is recorded of a model; ``template``: how to rebuild the template (e.g. its JSON file's path)."""
    return {"model": name or engine.model_name, "fingerprint": engine.fingerprint,
            "template": template or engine.template.name, "template_version": engine.template.version,
            "kv_dtype": str(engine.dtype).removeprefix("torch.")}


def add(docstore: Docstore, engine: BlockEngine, name: str | None, *, default: bool = False,
        template: str | None = None) -> None:
    """Record ``engine``'s model (hold the writer lock); ``default`` also makes it the default model."""
    record = describe(engine, name, template)
    with docstore.transaction() as tx:
        tx.add_model(id_of(engine), record["fingerprint"], record["template_version"], record["template"],
                     record["model"], record["kv_dtype"])
        if engine.template.render_prefix():  # pinned from the start: asking may encode it before any ingest
            tx.set_model_prefix(id_of(engine), engine.key_of(engine.prefix_ids()))
        if default:
            for key, value in record.items():
                tx.set_meta(key, value)
        tx.bump_version()


def needs_writing(docstore: Docstore, engine: BlockEngine, on_mismatch: str, where) -> bool:
    """Whether attaching ``engine`` must write (a new model, or passages without its keys); refuses or
    warns about a model the knowledge base does not know.

    Raises:
        KVBlockMismatchError: a new model and on_mismatch="refuse".
    """
    mid = id_of(engine)
    known = docstore.models()
    if mid in {m["id"] for m in known}:
        return bool(docstore.passages_without(mid))
    names = ", ".join(f"{m['name']!r} ({m['fingerprint'][:12]}, template {m['template']!r})" for m in known)
    what = (f"knowledge base at {where} holds KV for {names}; the engine's model {engine.model_name!r} "
            f"({engine.fingerprint[:12]}, template {engine.template.name!r}) is not one of them")
    if on_mismatch == "refuse":
        raise KVBlockMismatchError(
            f"{what}; refusing to open (on_mismatch='refuse'). Open with on_mismatch='add' (CLI: --on-mismatch "
            "add) to add this model (the KV of the others is kept), or use a known model")
    logger.warning("%s; adding it: its blocks are encoded when first needed, the other models' KV is kept", what)
    return True


def add_if_new(docstore: Docstore, engine: BlockEngine, name: str | None, template: str | None) -> bool:
    """Record ``engine``'s model unless known (hold the writer lock); True if it was added."""
    if id_of(engine) in {m["id"] for m in docstore.models()}:
        return False
    add(docstore, engine, name, template=template)
    return True


def fill_keys(docstore: Docstore, engine: BlockEngine) -> int:
    """Block keys of ``engine``'s model for passages that have none yet (hold the writer lock)."""
    mid = id_of(engine)
    rows = docstore.passages_without(mid)
    if rows:
        with docstore.transaction() as tx:
            for row in rows:
                ids = engine.block_ids(Passage(row["text"], row["title"]))
                tx.set_model_block(mid, row["vec_id"], engine.key_of(ids), len(ids))
            tx.bump_version()
    return len(rows)


def find(docstore: Docstore, selector: str) -> dict[str, Any]:
    """The one known model whose name, fingerprint (or a prefix of it, 8+ digits) or id is ``selector``."""
    if not isinstance(selector, str) or not selector.strip():
        raise InvalidInputError(f"expected a model name or fingerprint, found {selector!r}")
    models = docstore.models()
    matches = [m for m in models if selector in (m["id"], m["name"], m["fingerprint"])
               or (len(selector) >= 8 and m["fingerprint"].startswith(selector))]
    if len(matches) != 1:
        known = ", ".join(f"{m['name']} ({m['fingerprint'][:12]})" for m in models) or "none"
        what = "no model" if not matches else f"{len(matches)} models"
        raise KnowledgeBaseError(f"expected one known model matching {selector!r}, found {what}; the knowledge "
                                 f"base holds KV for: {known}")
    return matches[0]


def forget(docstore: Docstore, selector: str) -> dict[str, Any]:
    """Drop a model's block keys (hold the writer lock); its KV files become orphans for ``gc``.

    Refuses the last model (the knowledge base would have none to answer with). Forgetting the default
    model makes the next one (in the order they were added) the default.
    """
    model = find(docstore, selector)
    models = docstore.models()
    if len(models) == 1:
        raise KnowledgeBaseError(f"expected another model to remain, found {model['name']!r} "
                                 f"({model['fingerprint'][:12]}) is the only model of the knowledge base; "
                                 "delete the directory to drop everything")
    with docstore.transaction() as tx:
        tx.forget_model(model["id"])
        if models[0]["id"] == model["id"]:
            new = models[1]
            for key, value in (("model", new["name"]), ("fingerprint", new["fingerprint"]),
                               ("template", new["template"]), ("template_version", new["template_version"]),
                               ("kv_dtype", new["kv_dtype"])):
                tx.set_meta(key, value or "")
        tx.bump_version()
    return model
