"""Routing (issue 6): decide which project a stable study belongs to. Not built yet."""
