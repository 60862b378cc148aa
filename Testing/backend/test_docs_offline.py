"""/docs works air-gapped: Swagger UI's page and every asset it references come from our own server (fastapi-offline),
no CDN; with --token the documentation stays readable without it (it holds no data), the API behind it does not."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlparse

import requests
from backend_process import BackendProcess


def test_docs_and_their_assets_come_from_this_server_without_the_token():
    with BackendProcess("--engine", "builtin", "--token", "s3cret-token") as bp:
        url = bp.url
        page = requests.get(f"{url}/docs", timeout=30)
        assert page.status_code == 200 and "swagger" in page.text.lower()
        refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]|url:\s*['"]([^'"]+)['"]""", page.text)
        refs = [a or b for a, b in refs]
        assert any(r.endswith(".js") for r in refs) and any(r.endswith(".css") for r in refs), refs
        assert "/openapi.json" in refs, refs
        for ref in refs:
            target = urljoin(f"{url}/docs", ref)
            assert urlparse(target).netloc == urlparse(url).netloc, f"{ref}: not from this server"
            r = requests.get(target, timeout=30)
            assert r.status_code == 200 and len(r.content) > 100, (ref, r.status_code)
        assert not re.search(r"https?://(?!127\.0\.0\.1)", page.text), "an external URL in the page"
        schema = requests.get(f"{url}/openapi.json", timeout=30).json()
        # the Authorize button: the schema declares the bearer token the API needs
        assert any(v.get("scheme") == "bearer" for v in schema["components"]["securitySchemes"].values())
        # the API itself still needs the token
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
        ok = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-token"}, timeout=30)
        assert ok.status_code == 200
