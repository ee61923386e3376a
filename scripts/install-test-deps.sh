#!/usr/bin/env bash
# System packages the test suite needs beyond the virtualenv: headless Chromium and its WebDriver
# for the web chat page test (tests/serve/test_web_page.py). Idempotent: does nothing when both
# are already installed; needs root (or sudo) only when something is missing.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-test-deps: chromium + chromium-driver missing and not root; the page test will skip" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: no apt-get; install chromium and chromedriver yourself (the page test skips without them)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
