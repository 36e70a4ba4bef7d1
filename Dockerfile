# syntax=docker/dockerfile:1
# microsvc on Gunicorn 27 (needs Python >= 3.10), serving the demo service by default.
# Your own app: build a derived image, e.g.
#   FROM microsvc
#   COPY --chown=root:root myapp/ /app/myapp/
#   CMD ["microsvc", "run", "myapp:app", "--bind", "0.0.0.0:8000", "--workers", "auto"]
# See docs/docker.md.

# The request path compiled with mypyc (setup.py), in a stage with a C compiler: the
# image installs the wheel and carries no compiler.
FROM python:3.12-slim-bookworm AS wheel
# The release's own gcc: its exact version changes nothing the wheel does.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY setup.py setup.cfg pyproject.toml README.md LICENSE /src/
COPY microsvc/ /src/microsvc/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: this layer is rebuilt only when the package
# metadata changes, not on every code change. The skeleton (just the version module) is
# enough for setuptools to read the metadata.
COPY setup.cfg pyproject.toml README.md LICENSE /src/
COPY microsvc/_version.py /src/microsvc/_version.py
RUN touch /src/microsvc/__init__.py \
    && pip install --no-cache-dir "/src[gevent]"

# Then the code (the wheel built above), without touching the dependencies.
COPY --from=wheel /wheels/ /wheels/
RUN pip install --no-cache-dir --no-deps --force-reinstall /wheels/*.whl \
    && rm -rf /src /wheels

# A user of its own, with a home for gunicorn's control socket; the code stays root-owned.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin microsvc
USER 10001

EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["microsvc", "run", "--bind", "0.0.0.0:8000", "--workers", "auto"]
