# syntax=docker/dockerfile:1
# Serving image: base dependencies only (no torch, no transformers), the committed model baked in.
# BASE: any Debian-like image with Python 3.11+ and a `python` on PATH; where no registry is reachable,
# a local one (for example built with debootstrap) stands in for python:3.11-slim.
ARG BASE=python:3.11-slim

FROM ${BASE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
# Only the files that decide the dependencies, so this layer is cached until they change.
COPY pyproject.toml constraints.txt README.md ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt . \
    && /opt/venv/bin/pip uninstall -y clinc-intent

FROM ${BASE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    INTENT_HOST=0.0.0.0 \
    INTENT_PORT=8000 \
    INTENT_WORKERS=0 \
    INTENT_ORT_INTRA_THREADS=1
# INTENT_WORKERS=0 sizes the workers to the container's CPU quota (cgroup cpu.max), one ORT thread each.
RUN groupadd --gid 10001 intent \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin intent
COPY --from=deps /opt/venv /opt/venv
WORKDIR /srv
COPY app/ app/
COPY models/ models/
USER 10001:10001
EXPOSE 8000
# The port the service listens on: INTENT_PORT, which `docker run -e` may change.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('INTENT_PORT') or '8000'; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
