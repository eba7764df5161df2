FROM python:3.11-slim

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY server.py config.py errors.py sessions.py sse.py tls.py ws.py ./
COPY asr/ asr/
COPY rtc/ rtc/
COPY web/ web/

# WebRTC media is UDP on ephemeral ports that aiortc cannot restrict to a range:
# run with host networking (docker run --network host), or give clients a TURN server.
ENV STT_HOST=0.0.0.0 STT_PORT=8000
EXPOSE 8000
CMD ["python", "server.py"]
