#!/usr/bin/env bash
# `make bench`: nginx proxy_pass vs Portcullis in front of the same nginx upstream,
# measured in one run (docs/benchmarks.md). Installs nginx, wrk and hey when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
for tool in nginx wrk hey; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  pkgs=()
  for t in "${need[@]}"; do case "$t" in nginx) pkgs+=(nginx-light);; *) pkgs+=("$t");; esac; done
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${pkgs[*]})" >&2; exit 1
  fi
fi
exec .venv/bin/python scripts/bench/bench.py "$@"
