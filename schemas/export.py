"""JSON Schema export of every model, for client developers (`tickwave schema`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.events import PriceChange, Signal, SignalChange, Tick
from schemas.messages import CLIENT_MESSAGES, HTTP_RESPONSES, SERVER_MESSAGES

ALL_MODELS: tuple[type[BaseModel], ...] = (
    Tick, Signal, SignalChange, PriceChange, *CLIENT_MESSAGES, *SERVER_MESSAGES, *HTTP_RESPONSES,
)


def write_json_schemas(directory: Path) -> list[Path]:
    """Write one `<Model>.schema.json` per model (draft 2020-12) and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in ALL_MODELS:
        schema = model.model_json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema.setdefault("title", model.__name__)
        path = directory / f"{model.__name__}.schema.json"
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written
