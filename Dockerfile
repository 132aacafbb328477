# turnstile container image. Built with the official Rust image, run on
# distroless (glibc, CA certificates, no shell) as the non-root user 65532.
#
#   docker build -t turnstile .
#   docker run -v "$PWD/docker/sidecar:/etc/turnstile:ro" -p 8080:8080 turnstile
#
# Config: /etc/turnstile/turnstile.toml. Mount the directory rather than the
# file, so that an edited file is what `docker kill -s HUP` reloads.
# Snapshots: the volume /var/lib/turnstile (owned by 65532).
# The README's "Docker" section has the rest.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: a source change rebuilds only
# turnstile itself, a Cargo.lock change rebuilds the dependencies.
# (A placeholder build script too: the build dependencies are compiled here.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/decision.rs \
    && echo 'fn main() {}' > build.rs \
    && cargo build --release --locked --bin turnstile \
    && rm -rf src benches build.rs

# build.rs compiles proto/ (Envoy's rate limit service) into Rust.
COPY build.rs build.rs
COPY proto proto
COPY src src
COPY benches benches
# touch: the copied sources may be older than the placeholder build.
RUN touch build.rs src/main.rs src/lib.rs \
    && cargo build --release --locked --bin turnstile \
    && install -D -m 0755 target/release/turnstile /out/usr/local/bin/turnstile \
    && install -d -m 0750 /out/var/lib/turnstile \
    && install -d -m 0755 /out/etc/turnstile

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/turnstile /usr/local/bin/turnstile
COPY --from=build --chown=65532:65532 /out/var/lib/turnstile /var/lib/turnstile
COPY --from=build /out/etc/turnstile /etc/turnstile
USER 65532:65532
ENV TURNSTILE_CONFIG=/etc/turnstile/turnstile.toml \
    TURNSTILE_LOG_FORMAT=json
VOLUME ["/var/lib/turnstile"]
# The proxy and the admin listener (as in docker/sidecar/turnstile.toml).
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/turnstile", "health"]
ENTRYPOINT ["/usr/local/bin/turnstile"]
