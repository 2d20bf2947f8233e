# kounta-proxy as a sidecar image.
# Build: docker build -t kounta-proxy:0.1.0 .
# The install and start commands below are the ones tests/e2e/test_container.py runs in a
# clean virtual environment, so a green CI means this image installs and starts.

# --- build: a virtual environment with the package and its pinned dependencies
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY proxy ./proxy
RUN python -m venv /opt/kounta-proxy && /opt/kounta-proxy/bin/pip install --no-cache-dir --constraint requirements.lock .

# --- runtime: the same Python, the virtual environment, a non-root user
FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="kounta-proxy" \
      org.opencontainers.image.description="Caching reverse proxy for the Kounta (Lightspeed) POS API" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 kounta \
    && useradd --system --uid 10001 --gid kounta --home-dir /var/lib/kounta-proxy --shell /usr/sbin/nologin kounta \
    && mkdir -p /var/lib/kounta-proxy /etc/kounta-proxy \
    && chown kounta:kounta /var/lib/kounta-proxy
COPY --from=build /opt/kounta-proxy /opt/kounta-proxy
# Listening beyond loopback needs caller keys ([callers.NAME]) or inbound.allow_anonymous = true:
# the proxy refuses to start otherwise. The admin port serves /metrics, /healthz and /readyz.
ENV PATH="/opt/kounta-proxy/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    KOUNTA_PROXY_STATE_DIR=/var/lib/kounta-proxy \
    KOUNTA_PROXY_SERVER__HOST=0.0.0.0 \
    KOUNTA_PROXY_SERVER__PORT=8080 \
    KOUNTA_PROXY_ADMIN__HOST=0.0.0.0 \
    KOUNTA_PROXY_ADMIN__PORT=9464
# Settings: mount a file at /etc/kounta-proxy/kounta-proxy.toml (read from the working
# directory) and/or set KOUNTA_PROXY_* variables; secrets as *_FILE pointing at /run/secrets.
WORKDIR /etc/kounta-proxy
VOLUME ["/var/lib/kounta-proxy"]
EXPOSE 8080 9464
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('KOUNTA_PROXY_ADMIN__PORT', '9464'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3).status != 200)"]
ENTRYPOINT ["kounta-proxy", "serve"]
STOPSIGNAL SIGTERM
