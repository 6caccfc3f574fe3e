"""GET /openapi.json: the OpenAPI 3.1 document of every route (v1, V2, admin),
kept in app/http/openapi.yaml; tests/test_openapi.py holds it to the routes."""
from __future__ import annotations

from pathlib import Path

import falcon
import orjson
import yaml

from app.http.errors import JSON

DOCUMENT = Path(__file__).with_name("openapi.yaml")


def load(path: Path = DOCUMENT) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


class Document:
    endpoint = "openapi"

    def __init__(self, path: Path = DOCUMENT):
        self.body = orjson.dumps(load(path))  # read once, in the master

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON
        resp.data = self.body
