# presence-hub: one hub node. Give it a Redis and a secret:
#   docker run -e PRESENCE_HUB_REDIS_URL=redis://redis:6379 -e PRESENCE_HUB_SECRET=... \
#              -p 8765:8765 -p 8766:8766 presence-hub
# Without PRESENCE_HUB_REDIS_URL it runs its own embedded Redis in /data.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 hub \
    && mkdir /data && chown hub:hub /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY presence_hub ./presence_hub
RUN pip install --no-cache-dir .

USER hub
ENV PRESENCE_HUB_HOST=0.0.0.0 \
    PRESENCE_HUB_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8765 8766
ENTRYPOINT ["presence-hub"]
CMD ["serve"]
