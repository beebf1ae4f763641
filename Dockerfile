FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY middlewares ./middlewares
COPY providers ./providers
COPY config ./config
RUN pip install --no-cache-dir .
EXPOSE 8080
ENTRYPOINT ["llm-gateway"]
CMD ["serve", "--config", "/app/config/gateway.yaml"]
