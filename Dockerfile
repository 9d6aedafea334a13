FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.37
ADD https://github.com/grpc-ecosystem/grpc-health-probe/releases/download/${GRPC_HEALTH_PROBE_VERSION}/grpc_health_probe-linux-amd64 /usr/local/bin/grpc_health_probe
RUN chmod +x /usr/local/bin/grpc_health_probe && useradd --system --home /var/lib/upscaler upscaler \
    && mkdir -p /var/lib/upscaler/tmp && chown -R upscaler /var/lib/upscaler
COPY --from=build /src/target/release/upscaler /usr/local/bin/upscaler
COPY --from=build /src/weights /opt/upscaler/weights
ENV UPSCALER_WEIGHTS_DIR=/opt/upscaler/weights DATA_DIR=/var/lib/upscaler/data
USER upscaler
EXPOSE 50051
ENTRYPOINT ["upscaler"]
CMD ["serve"]
