# The promo-stream worker image, for docker-compose.kafka.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY stream ./stream
COPY encoder ./encoder
COPY deploy ./deploy
RUN pip install --no-cache-dir -r requirements.lock && pip install --no-cache-dir --no-deps .
ENTRYPOINT []
CMD ["promo", "worker"]
