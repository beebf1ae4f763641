# The gateway image; compose.yaml also runs the simulated providers (`mock-provider`) from it.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY middlewares ./middlewares
COPY providers ./providers
COPY config ./config
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --no-create-home gateway
USER gateway
EXPOSE 8080
# Logs: one JSON line per request on stdout. Metrics: GET /metrics. Liveness: GET /healthz.
ENTRYPOINT ["llm-gateway"]
CMD ["serve", "--config", "/app/config/gateway.yaml"]
