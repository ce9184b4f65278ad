# The app image: the archiver, Celery and Flower. One image for every app service in
# docker-compose.yml (worker, storage-node worker, beat, flower); the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when
# pyproject.toml changes, not with every change to the code copied after it.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', \
    *p['dependencies'], *p['optional-dependencies']['flower']])"
# Then the code; installing it needs nothing new (--no-deps).
COPY README.md ./
COPY workers ./workers
COPY beat ./beat
RUN pip install --no-deps .

# Mount points. Staging and beat state are named volumes in docker-compose.yml; a fresh
# named volume copies these modes, so any CCARCHIVE_UID can write there.
RUN mkdir -p /data/checkpoints /data/archive /data/staging /var/lib/ccarchive \
    && chmod 1777 /data/staging /var/lib/ccarchive

# Not root by default. The checkpoint tree belongs to cc-backend's user: run as that user
# (docker-compose.yml: user: "${CCARCHIVE_UID}:${CCARCHIVE_GID}") so deletions work.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /var/lib/ccarchive ccarchive
USER 1000:1000
WORKDIR /var/lib/ccarchive

CMD ["celery", "-A", "workers", "worker", "-l", "INFO"]
