# One image with all four Sluice binaries; docker-compose.yml and the Helm chart pick one per
# container with `command`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/sluice-ingest target/release/sluice-worker \
       target/release/sluice-results target/release/sluice-model-sim /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 sluice
COPY --from=build /out/ /usr/local/bin/
USER sluice
ENV SLUICE_LOG_FORMAT=json
CMD ["sluice-ingest"]
