#!/usr/bin/env bash
# Optional speed-up on Linux: the mlx[cpu] wheel ships the reference BLAS, and
# burnish routes float32 matmuls through the system OpenBLAS when it finds one.
# Installs it only where we can (Linux, root, apt); burnish works without it.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0' && exit 0
[ "$(id -u)" = "0" ] || { echo "note: OpenBLAS not found; float32 on CPU will be slow (see README)"; exit 0; }
command -v apt-get >/dev/null || exit 0
echo "installing the system OpenBLAS (optional, for float32 speed on CPU)"
apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; } \
  || echo "note: could not install OpenBLAS; continuing without it"
exit 0
