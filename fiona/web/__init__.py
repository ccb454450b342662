"""FIONA's web interface and HTTP API (served by ``fiona serve`` when ``web:`` is configured)."""

from fiona.web.app import WebContext, create_app

__all__ = ["WebContext", "create_app"]
