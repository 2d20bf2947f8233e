"""kounta-proxy: a local caching reverse proxy for the Kounta API."""

__version__ = "0.1.0"
