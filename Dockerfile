FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/upscaler upscaler \
    && mkdir -p /var/lib/upscaler/tmp && chown -R upscaler /var/lib/upscaler
COPY --from=build /src/target/release/upscaler /usr/local/bin/upscaler
# Found from /usr/local/bin/upscaler as <exe>/../share/upscaler/weights: no setting needed.
COPY --from=build /src/weights /usr/local/share/upscaler/weights
ENV DATA_DIR=/var/lib/upscaler TEMP_DIR=/var/lib/upscaler/tmp UPSCALER_SOURCE_WEIGHTS=0
USER upscaler
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["upscaler", "health", "--timeout", "4"]
ENTRYPOINT ["upscaler"]
CMD ["serve"]
