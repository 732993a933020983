# syntax=docker/dockerfile:1
# The integrations credential service. Configuration comes only from the
# environment and mounted files (keyring, TLS certificates, policy): see README.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: wheels for the service, its client package and every pinned dependency
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt pyproject.toml README.md ./
COPY clients/python clients/python
COPY service service
# The same install step as `make install` and CI, minus the dev extras: pinned by constraints.txt, and so
# is what builds the two projects (setuptools, through --build-constraint: -c does not reach a build's
# isolated environment), with the pip that knows that option (25.3+; the base image's is older).
RUN python -m pip install -c constraints.txt pip \
    && python -m pip wheel --wheel-dir /wheels -c constraints.txt --build-constraint constraints.txt ./clients/python .

# --- runtime: the wheels installed into a virtualenv, no build tools, no pip (the venv's nor the base
#     image's), no pip cache, no sources
FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    INTEGRATIONS_MODE=production \
    INTEGRATIONS_LISTEN_ADDRESS=0.0.0.0:50051 \
    INTEGRATIONS_METRICS_ADDRESS=0.0.0.0:9464 \
    INTEGRATIONS_DATA_DIR=/var/lib/integrations
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels integrations-service \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /usr/local/bin/python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 integrations \
    && useradd --system --uid 10001 --gid integrations --home-dir /var/lib/integrations --create-home integrations
USER 10001:10001
WORKDIR /var/lib/integrations
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["integrations-service", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["integrations-service"]
CMD ["serve"]
