# Multi-stage build: a static-ish release binary on a small non-root runtime image.
#   docker build -t callnotify .
#   docker run -p 8080:8080 -v callnotify-data:/data -v $PWD/config:/config:ro \
#     --stop-timeout 30 -e CALLNOTIFY_SERVER__TOKENS=... callnotify
# (Air's token, 16+ characters. config/callnotify.yaml has `tokens: []`, so without the override
# the endpoint is open; a config of your own that says ["${AIR_WEBHOOK_TOKEN}"] takes
# -e AIR_WEBHOOK_TOKEN=... instead.)
# --stop-timeout 30: Docker's default, 10 s, would kill the daemon while delivery.shutdown_grace
# (also 10 s) lets in-flight deliveries finish and the store close (docs/DELIVERY.md, Shutdown).
# The ENV below sets server.listen, store.path and templates_dir over any mounted config (the
# start-up log and `check` name them). Templates of your own: mount them over /templates
# (-v $PWD/templates:/templates:ro), or pass -e CALLNOTIFY_TEMPLATES_DIR=/config/templates.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
COPY tests/fixtures ./tests/fixtures
RUN cargo build --release --locked --bin callnotify

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /data --shell /usr/sbin/nologin callnotify \
 && mkdir -p /data /config && chown callnotify /data
COPY --from=build /src/target/release/callnotify /usr/local/bin/callnotify
COPY templates /templates
COPY config/callnotify.yaml /config/callnotify.yaml
USER callnotify
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENV CALLNOTIFY_CONFIG=/config/callnotify.yaml \
    CALLNOTIFY_SERVER__LISTEN=0.0.0.0:8080 \
    CALLNOTIFY_STORE__PATH=/data/callnotify.db \
    CALLNOTIFY_TEMPLATES_DIR=/templates \
    CALLNOTIFY_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/callnotify"]
CMD ["serve"]
