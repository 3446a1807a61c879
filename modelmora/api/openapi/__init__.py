"""The OpenAPI 3.1 document of the native API (`document`, committed as `schema/openapi.json` by
`just schema`) and the offline Swagger UI page that renders it (`DOCS_HTML`)."""

from .docs import DOCS_HTML, swagger_assets_dir
from .document import document, document_bytes

__all__ = ("DOCS_HTML", "document", "document_bytes", "swagger_assets_dir")
