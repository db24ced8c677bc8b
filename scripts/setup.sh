#!/usr/bin/env bash
# Create ./.venv (Python >= 3.11) and install llava-deft with its test tools, once.
# Sourced by demo.sh and test.sh; re-running is a no-op when the install is current.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
stamp=.venv/.llava-deft-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing llava-deft and its dependencies into .venv (first run only)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  # espeak-ng speaks the audio task (scripts/make_audio_task.py); without it tests use committed clips
  if ! command -v espeak-ng >/dev/null; then
    SUDO=none
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    if [ "$SUDO" != none ] && command -v apt-get >/dev/null \
      && { $SUDO apt-get install -y -q espeak-ng >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q espeak-ng >/dev/null 2>&1; }; }; then
      echo "[setup] installed espeak-ng"
    else
      echo "[setup] espeak-ng is missing and could not be installed (apt-get install espeak-ng); continuing without it"
    fi
  fi
  # chromium + chromedriver: the viewer's browser test (tests/test_viewer.py) drives a real headless browser
  if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    SUDO=none
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    if [ "$SUDO" != none ] && command -v apt-get >/dev/null \
      && { $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; then
      echo "[setup] installed chromium and chromium-driver (apt-get) for the viewer's browser test"
    else
      echo "[setup] chromium / chromedriver are missing and could not be installed (apt-get install chromium chromium-driver);"
      echo "[setup] tests/test_viewer.py's browser test will fail until they are (LLAVA_DEFT_SKIP_BROWSER=1 skips it)"
    fi
  fi
  touch "$stamp"
fi
