# The modelfleet image: `docker build -t modelfleet .`, then
#   docker run --rm modelfleet controller | worker ... | submit ... | loadgen ...
# docker-compose.yml builds it for the controller, the workers and the load generator.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package and its dependencies (pyproject.toml), installed into the image's Python.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && useradd --create-home --uid 10001 modelfleet

# The documented defaults (./config/settings.toml relative to the working directory);
# override any of them with MODELFLEET_<SECTION>__<KEY> environment variables.
COPY config/settings.toml ./config/settings.toml

USER modelfleet
ENTRYPOINT ["modelfleet"]
CMD ["--help"]
