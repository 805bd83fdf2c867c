"""The dashboard at `/`: one static page and its script, served from the package (no CDN:
the 3D viewer is model-viewer from the npm registry, vendored with its licences).

The page holds no data and no secret; everything it shows comes from the REST API, which
needs the API token when one is set (the page asks for it once per browser session).
Every value is put into the page as text, never as HTML.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

STATIC = Path(str(resources.files("service") / "static"))
#: The page's own code only; media from anywhere a preview URL points (presigned S3 URLs,
#: the provider's CDN); fetches likewise (the 3D viewer fetches its model).
POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src * data: blob:; media-src * blob:; connect-src * blob: data:; worker-src blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=HEADERS)


def setup_dashboard(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, append_version=True)
