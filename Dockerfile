# syntax=docker/dockerfile:1
# One image for the whole platform; the command picks the service:
#   docker run crm-platform python -m crm_common.serve loyalty --host 0.0.0.0 --port 8003
#   docker run crm-platform python deploy/init.py          # topics + migrations (one-shot job)
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: resolve exactly what uv.lock pins into /app/.venv -----------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
# The same uv as the dev toolchain (root pyproject, dependency group dev).
RUN python -m pip install uv==0.13.8
WORKDIR /src

# Dependencies first, from the lock and the workspace manifests only, so a code change does not
# re-download them.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/pyproject.toml
COPY services/ingest/pyproject.toml services/ingest/pyproject.toml
COPY services/segmentation/pyproject.toml services/segmentation/pyproject.toml
COPY services/loyalty/pyproject.toml services/loyalty/pyproject.toml
COPY services/offers/pyproject.toml services/offers/pyproject.toml
COPY services/notifier/pyproject.toml services/notifier/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --all-packages --no-install-workspace --python /usr/local/bin/python

# Then the workspace packages themselves, installed non-editable so the runtime stage needs no
# source tree (migrations ship inside each service package).
COPY libs/common libs/common
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --all-packages --no-editable --python /usr/local/bin/python

# ---- runtime: slim, no build tools, non-root -------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CRM_HOST=0.0.0.0
RUN groupadd --system --gid 10001 crm \
 && useradd --system --uid 10001 --gid crm --home-dir /app --no-create-home --shell /usr/sbin/nologin crm
WORKDIR /app
COPY --from=builder /app/.venv /app/.venv
COPY deploy/init.py /app/deploy/init.py
USER 10001:10001
EXPOSE 8001 8002 8003 8004 8005
CMD ["python", "-m", "crm_common.serve", "ingest", "--host", "0.0.0.0", "--port", "8001"]
