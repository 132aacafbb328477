#!/usr/bin/env bash
# Builds local stand-ins for the base images that the Dockerfile and the
# compose files name, for a Docker engine that cannot pull them (this
# project's CI machines have no container registry). An image already
# present under one of those tags and not made here (a real one) is left
# alone, and a pull is tried before any stand-in is built. Stand-ins carry the label turnstile.standin; remove them with
# `docker/standins.sh --remove`.
#
# Recipes, all from one `debootstrap --variant=minbase` Debian tree:
#   rust:*-bookworm                     the tree + gcc + this machine's Rust toolchain,
#                                       cargo settings and trusted certificates
#   gcr.io/distroless/cc-debian12:*     glibc, libgcc, CA certificates, users root/nonroot
#   redis:*-bookworm                    the tree + Debian's redis-server
# The Debian mirror (and any apt proxy) is read from this machine's apt
# configuration; nothing here names one.
set -euo pipefail
cd "$(dirname "$0")/.."

suite=bookworm
label=turnstile.standin
cache="${TURNSTILE_STANDIN_CACHE:-$PWD/target/docker-standins}"
base="turnstile-standin/debian:$suite"

say() { echo "== standins: $*"; }
die() { echo "standins: $*" >&2; exit 1; }

# Every image the Dockerfile and the compose files name (not the ones they build).
named_images() {
  awk 'toupper($1) == "FROM" { print $2 }' Dockerfile
  grep -hE '^\s+image:\s' docker/*.yaml | awk '{ print $2 }' | grep -v '\$' || true
}

is_standin() { [[ -n "$(docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null)" ]]; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }

if [[ "${1:-}" == "--remove" ]]; then
  for image in $(named_images | sort -u) "$base"; do
    if is_standin "$image"; then
      docker rmi "$image" >/dev/null && say "removed $image"
    fi
  done
  exit 0
fi

# docker build, its output shown only if it fails.
quiet_build() {
  docker build -t "$1" "$2" >"$2.log" 2>&1 || { tail -n 30 "$2.log" >&2; die "building $1 failed"; }
  rm -f "$2.log"
}


# The first deb URI of this machine's apt sources that serves $suite.
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] || continue
    # deb822 stanzas: the URIs of a stanza whose Suites list $suite itself.
    awk -v suite="$suite" '
      BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; ok = 0; deb = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); uris = $i }
          if ($i ~ /^Suites:/) { n = split(substr($i, 8), s, /[ \t]+/); for (j = 1; j <= n; j++) if (s[j] == suite) ok = 1 }
          if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
        }
        if (ok && deb && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -e "$f" ]] || continue
    # deb [options] URI suite components
    sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
  done
}

debian_tree() {
  local tree="$cache/rootfs-$suite"
  if [[ -e "$tree/.complete" ]]; then
    echo "$tree"
    return
  fi
  command -v debootstrap >/dev/null || {
    say "installing debootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  }
  local mirror
  mirror="$(apt_mirror | head -n 1)"
  [[ -n "$mirror" ]] || die "no apt source for $suite in /etc/apt: cannot debootstrap"
  # An apt proxy, if this machine uses one, for debootstrap's downloads too.
  local proxy=""
  eval "$(apt-config shell proxy Acquire::http::Proxy)"
  say "debootstrap $suite (minbase) from this machine's apt mirror" >&2
  rm -rf "$tree"
  mkdir -p "$cache"
  http_proxy="${proxy:-${http_proxy:-}}" debootstrap --variant=minbase \
    --include=ca-certificates,gcc,libc6-dev,redis-server \
    "$suite" "$tree" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
  rm -rf "$tree/var/cache/apt/archives/"*.deb
  touch "$tree/.complete"
  echo "$tree"
}

import_base() {
  if exists "$base"; then return; fi
  local tree
  tree="$(debian_tree)"
  say "importing $base"
  tar -C "$tree" --exclude=./.complete -c . \
    | docker import --change "LABEL $label=debian" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$base" >/dev/null
}

# rust:VERSION-...: the Debian tree with gcc plus this machine's toolchain,
# laid out like the official image (RUSTUP_HOME, CARGO_HOME, PATH).
build_rust() {
  local image="$1" want have sysroot ctx
  want="$(sed -E 's/^rust:([0-9]+\.[0-9]+).*/\1/' <<<"$image")"
  have="$(rustc --version | awk '{ print $2 }')"
  if [[ "$have" != "$want" && "$have" != "$want".* ]]; then
    echo "standins: WARNING: $image stands in with this machine's rustc $have" >&2
  fi
  import_base
  sysroot="$(rustc --print sysroot)"
  ctx="$(mktemp -d)"
  mkdir -p "$ctx/toolchain" "$ctx/cargo/bin"
  # The compiler and cargo, without docs and sources.
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  [[ -d "$sysroot/libexec" ]] && cp -a "$sysroot/libexec" "$ctx/toolchain/"
  for tool in cargo rustc rustdoc; do
    ln -s "/usr/local/rustup/toolchains/$have/bin/$tool" "$ctx/cargo/bin/$tool"
  done
  # This machine's registry settings for cargo, if it has any.
  local home="${CARGO_HOME:-$HOME/.cargo}" conf
  for conf in config.toml config; do
    [[ -f "$home/$conf" ]] && cp "$home/$conf" "$ctx/cargo/config.toml" && break
  done
  # This machine's trusted certificates: where its network intercepts TLS
  # with its own authority, cargo in the build stage must trust it too.
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY toolchain /usr/local/rustup/toolchains/$have
COPY cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=$have
LABEL $label=rust
DOCKERFILE
  say "building $image (rustc $have)"
  quiet_build "$image" "$ctx"
  rm -rf "$ctx"
}

# gcr.io/distroless/cc-debian12:nonroot: only what a dynamically linked
# Rust program needs (glibc, libgcc, libstdc++, CA certificates), no shell,
# users root (0), nobody (65534) and nonroot (65532), like the real one.
build_distroless() {
  local image="$1" tree ctx
  tree="$(debian_tree)"
  ctx="$(mktemp -d)"
  python3 - "$tree" "$ctx/rootfs.tar" <<'PY'
import io, os, sys, tarfile
tree, out = sys.argv[1], sys.argv[2]
info = os.path.join(tree, "var/lib/dpkg/info")
packages = ["libc6", "libgcc-s1", "libstdc++6", "ca-certificates", "netbase"]
paths = set()
for pkg in packages:
    for name in (f"{pkg}:amd64.list", f"{pkg}.list"):
        p = os.path.join(info, name)
        if os.path.exists(p):
            paths.update(l.strip() for l in open(p) if l.strip() not in ("", "/."))
paths.update(["/etc/ssl/certs/ca-certificates.crt", "/etc/os-release", "/usr/lib/os-release"])

def real(path):
    # Package lists name pre-merged-/usr paths (/lib/...); store the real ones.
    parts = path.strip("/").split("/")
    top = os.path.join(tree, parts[0])
    if os.path.islink(top) and len(parts) > 1:
        parts = os.readlink(top).strip("/").split("/") + parts[1:]
    return "/".join(parts)

members = set()
for p in paths:
    r = real(p)
    if os.path.lexists(os.path.join(tree, r)):
        members.add(r)
        # and every parent directory
        d = os.path.dirname(r)
        while d:
            members.add(d)
            d = os.path.dirname(d)
with tarfile.open(out, "w") as tar:
    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(os.path.join(tree, top)):
            tar.add(os.path.join(tree, top), arcname=top, recursive=False)
    for m in sorted(members):
        if os.path.islink(os.path.join(tree, m)) and "/" not in m:
            continue  # a merged-/usr link, added above
        tar.add(os.path.join(tree, m), arcname=m, recursive=False)
    def add(name, data=None, mode=0o644, kind=tarfile.REGTYPE, uid=0):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid = kind, mode, uid, uid
        if data is None:
            tar.addfile(ti)
        else:
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    add("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    add("etc/group", b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
    add("root", None, 0o700, tarfile.DIRTYPE)
    add("home", None, 0o755, tarfile.DIRTYPE)
    add("home/nonroot", None, 0o700, tarfile.DIRTYPE, uid=65532)
    add("tmp", None, 0o1777, tarfile.DIRTYPE)
PY
  say "importing $image"
  docker import \
    --change "LABEL $label=distroless" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'USER 65532' \
    --change 'WORKDIR /home/nonroot' \
    "$ctx/rootfs.tar" "$image" >/dev/null
  rm -rf "$ctx"
}

build_redis() {
  local image="$1" ctx
  import_base
  ctx="$(mktemp -d)"
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
LABEL $label=redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
  say "building $image (Debian's redis-server)"
  quiet_build "$image" "$ctx"
  rm -rf "$ctx"
}

# A real image when the engine can get one: a pull is tried first (it also
# replaces a stand-in left by an earlier run), so a workstation that reaches
# a registry never builds on a look-alike. TURNSTILE_STANDIN_NO_PULL=1 skips it.
try_pull() {
  [[ "${TURNSTILE_STANDIN_NO_PULL:-}" == 1 ]] && return 1
  timeout "${TURNSTILE_STANDIN_PULL_TIMEOUT:-60}" docker pull -q "$1" >/dev/null 2>&1
}

for image in $(named_images | sort -u); do
  if exists "$image" && ! is_standin "$image"; then
    say "$image: a real image is present, using it"
    continue
  fi
  if try_pull "$image" && ! is_standin "$image"; then
    say "$image: pulled the real image"
    continue
  fi
  if exists "$image" && [[ "${TURNSTILE_STANDIN_REBUILD:-}" != 1 ]]; then
    say "$image: stand-in already built"
    continue
  fi
  case "$image" in
    rust:*-"$suite") build_rust "$image" ;;
    gcr.io/distroless/cc-debian12:*) build_distroless "$image" ;;
    redis:*-"$suite") build_redis "$image" ;;
    *) die "no stand-in recipe for $image (named in Dockerfile or docker/*.yaml)" ;;
  esac
done
