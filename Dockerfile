# syntax=docker/dockerfile:1
#
# Parley images, two targets from one file (docker-compose.yml builds both):
#   docker build --target api    -t parley-api .     # HTTP API and `parley migrate`; no torch
#   docker build --target worker -t parley-worker .  # GPU model workers
#
# The worker uses python:3.11-slim rather than an nvidia/cuda base: torch 2.13.0 from PyPI is
# the CUDA build and brings its own CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels, so
# a CUDA base image would only add gigabytes of a second CUDA copy that can disagree with the
# one torch was built against. The host provides just the driver (libcuda), mounted into the
# container by the NVIDIA Container Toolkit; it must be new enough for torch's CUDA version.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- shared base: Python, a virtualenv, the unprivileged user ----
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && useradd --system --user-group --uid 10001 --create-home --home-dir /home/parley parley
WORKDIR /app

# ---- dependency lists from pyproject.toml ----
# Only their content keys the dependency layers below, so editing the project's tool settings
# or its code does not reinstall torch.
FROM base AS requirements
COPY pyproject.toml ./
RUN python -c "import tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('requirements-app.txt', 'w').write('\n'.join(project['dependencies']) + '\n'); \
open('requirements-model.txt', 'w').write('\n'.join(project['optional-dependencies']['worker']) + '\n')"

# ---- API: FastAPI service, also runs the migrations ----
FROM base AS api
COPY --from=requirements /app/requirements-app.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements-app.txt
# Source last: a code change rebuilds only these layers. Owned by root, read-only to the app.
COPY pyproject.toml README.md alembic.ini celeryconfig.py ./
COPY migrations ./migrations
COPY app ./app
# Editable on purpose: `parley migrate` finds alembic.ini and migrations/ next to app/, which a
# regular install (app/ copied into site-packages, migrations/ left out) would separate.
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps -e .
USER 10001:10001
EXPOSE 8000
CMD ["parley", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---- worker: the model stack on the GPUs ----
FROM base AS worker
# Without these the NVIDIA runtime mounts only nvidia-smi's libraries, not CUDA's (libcuda).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/data/hf
COPY --from=requirements /app/requirements-model.txt /app/requirements-app.txt /tmp/
# The model stack first, in a layer of its own: it is by far the largest and changes least.
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements-model.txt
# hadolint ignore=DL3059
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements-app.txt
COPY pyproject.toml README.md alembic.ini celeryconfig.py ./
COPY app ./app
COPY worker ./worker
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps -e . \
 && mkdir -p "$HF_HOME" \
 && chown parley:parley "$HF_HOME"
# A new named volume mounted at HF_HOME copies this directory's owner, so the user can write it.
USER 10001:10001
CMD ["parley", "worker", "--gpus", "auto"]
