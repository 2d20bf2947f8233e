# kounta-proxy as a sidecar image (docs/container.md).
# Build: docker build -t kounta-proxy:0.1.0 .
# Real builds use the official slim Python image. CI (scripts/image-check) builds this same file
# with podman on a Debian base made with debootstrap (--build-arg BASE=...), whose python lives in
# /usr/bin rather than /usr/local/bin: so only `python3` and the virtual environment's own
# commands are used below. The machine's pip configuration, if any, comes in as the build secret
# "pip.conf" (docker build --secret id=pip.conf,src=$HOME/.config/pip/pip.conf .); it is
# mounted for the install step only and is in no layer.
# tests/e2e/test_container.py runs the install, ENTRYPOINT/CMD and HEALTHCHECK commands below in
# a clean virtual environment; scripts/image-check runs them in the built image.
ARG BASE=python:3.11.13-slim-bookworm

# --- build: a virtual environment with the package and its pinned dependencies (the lock
# includes the `fast` extra: the image runs on uvloop, server.event_loop = "auto")
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY proxy ./proxy
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python3 -m venv /opt/kounta-proxy \
    && /opt/kounta-proxy/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
    && /opt/kounta-proxy/bin/pip install --no-cache-dir --no-deps .
# The running proxy needs neither pip nor setuptools: they leave the environment (nothing can
# install into the image, and their advisories are not the proxy's).
RUN /opt/kounta-proxy/bin/python -m pip uninstall --yes --quiet pip setuptools

# --- runtime: the same Python, the virtual environment, a non-root user (no compiler, no pip cache)
FROM ${BASE}
LABEL org.opencontainers.image.title="kounta-proxy" \
      org.opencontainers.image.description="Caching reverse proxy for the Kounta (Lightspeed) POS API" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 kounta \
    && useradd --system --uid 10001 --gid kounta --home-dir /var/lib/kounta-proxy --shell /usr/sbin/nologin kounta \
    && mkdir -p /var/lib/kounta-proxy /etc/kounta-proxy \
    && chown kounta:kounta /var/lib/kounta-proxy
COPY --from=build /opt/kounta-proxy /opt/kounta-proxy
COPY scripts/healthcheck.py /usr/local/lib/kounta-proxy/healthcheck.py
# Listening beyond loopback needs caller keys ([callers.NAME]) or inbound.allow_anonymous = true:
# the proxy refuses to start otherwise. The admin port serves /metrics, /healthz and /readyz.
# The listeners' hosts are set here (variables win over the settings file); their ports are
# left to the file (defaults 8080 and 9464), and the HEALTHCHECK reads the admin port from the
# same place the proxy does.
ENV PATH="/opt/kounta-proxy/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    KOUNTA_PROXY_STATE_DIR=/var/lib/kounta-proxy \
    KOUNTA_PROXY_SERVER__HOST=0.0.0.0 \
    KOUNTA_PROXY_ADMIN__HOST=0.0.0.0 \
    KOUNTA_PROXY_SERVER__DRAIN_DELAY=5
# Settings: mount a file at /etc/kounta-proxy/kounta-proxy.toml (read from the working
# directory) and/or set KOUNTA_PROXY_* variables; secrets as *_FILE pointing at /run/secrets.
# State (tokens, the cache): mount a named volume at /var/lib/kounta-proxy. No VOLUME here: it
# would make an anonymous volume on every run that nobody removes (docs/container.md).
WORKDIR /etc/kounta-proxy
EXPOSE 8080 9464
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/kounta-proxy/healthcheck.py"]
# `docker run IMAGE` serves; `docker run -it IMAGE authorize --paste` (or check-config, cache
# stats, ...) runs another command with the same settings.
ENTRYPOINT ["kounta-proxy"]
CMD ["serve"]
STOPSIGNAL SIGTERM
