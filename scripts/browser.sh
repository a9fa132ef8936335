#!/usr/bin/env bash
# Installs what the console's browser test drives: Debian's Chromium and ChromeDriver
# (packages chromium and chromium-driver: /usr/bin/chromium, /usr/bin/chromedriver), with
# apt-get if missing. Safe to run twice. The test starts them itself, headless, with no
# network of their own (--disable-background-networking, --disable-component-update).
set -euo pipefail

say() { printf '\033[1m[browser]\033[0m %s\n' "$*" >&2; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "$(chromium --version 2>/dev/null | head -n1), $(chromedriver --version 2>/dev/null | head -n1 | cut -d' ' -f1-2)"
