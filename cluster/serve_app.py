"""The Serve import path that earlier versions wrote into Serve configs (`cluster.serve_app:build_app`)."""

from cluster.serve.app import build_app

__all__ = ["build_app"]
