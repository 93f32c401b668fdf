"""make openapi: write the app's OpenAPI document to docs/openapi.json (the README links it)."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def document() -> dict:
    from serve.gateway import api

    return api.openapi()


if __name__ == "__main__":
    out = REPO / "docs" / "openapi.json"
    out.write_text(json.dumps(document(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
