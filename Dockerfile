# Both binaries (sensors-worker, query-cli) in a small runtime image, running as a non-root user.
#   docker build -t sensor-pipeline .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sensors-worker -p query-cli \
 && mkdir -p /out && cp target/release/sensors-worker target/release/query-cli /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sensors
COPY --from=build /out/sensors-worker /out/query-cli /usr/local/bin/
USER 10001:10001
WORKDIR /home/sensors
EXPOSE 9184
CMD ["sensors-worker", "run"]
