"""The offline Swagger UI page at `/docs` (Swagger UI 5, which reads OpenAPI 3.1; its assets come
from the `swagger-ui-bundle-v2` package and are served by the server itself)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

__all__ = ("DOCS_HTML", "swagger_assets_dir")


def swagger_assets_dir() -> str:
    """The folder holding Swagger UI 5's dist files (swagger-ui-bundle.js, swagger-ui.css, favicons)."""
    import swagger_ui_bundle

    return str(Path(str(swagger_ui_bundle.swagger_ui_path)))


# The page's only script of its own. Swagger UI's defaults are overridden where they would reach
# another origin: `validatorUrl` (validator.swagger.io) is off.
_DOCS_SCRIPT = """
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
    });
  """

# The browser enforces that the page loads and sends nothing beyond this server: everything is
# 'self', the inline script is allowed by its hash only, images may also be data: (the CSS's icons)
# or blob: (binary responses shown by "Try it out").
_DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        f"script-src 'self' 'sha256-{base64.b64encode(hashlib.sha256(_DOCS_SCRIPT.encode()).digest()).decode()}'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)

DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta http-equiv="Content-Security-Policy" content="{_DOCS_CSP}">
  <meta name="referrer" content="no-referrer">
  <title>ModelMora API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>{_DOCS_SCRIPT}</script>
</body>
</html>
"""
