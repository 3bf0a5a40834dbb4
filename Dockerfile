# Consort's image: the API (`consort serve`) and, from a later issue, the runner.
# In this image PostgreSQL and NATS are external (CONSORT_DATABASE_URL, CONSORT_NATS_URL):
# see docker-compose.yml. Without them `consort serve` would start embedded ones in /data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY runner ./runner
RUN pip install . \
    && useradd --create-home --uid 10001 consort \
    && mkdir -p /data && chown consort:consort /data

USER consort
WORKDIR /data
ENV CONSORT_HOME=/data \
    CONSORT_HOST=0.0.0.0 \
    CONSORT_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

CMD ["consort", "serve", "--host", "0.0.0.0"]
