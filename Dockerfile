# One image for every cuscred process: the CLI (migrate), the worker, beat and Flower.
# docker-compose.yml picks the command; the default is the worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first (hash-pinned, as `make venv` installs them), so code changes reuse the layer.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

# The project itself, installed editable as `make venv` does: cuscred.db.migrate finds
# alembic.ini and migrations/ next to the package directory. Build tools come from the lock.
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY cuscred ./cuscred
COPY worker ./worker
COPY tasks ./tasks
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent cuscred

# Never root: the worker holds key material in memory.
USER cuscred

CMD ["celery", "-A", "worker", "worker", "-Q", "cuscred", "-l", "INFO"]
