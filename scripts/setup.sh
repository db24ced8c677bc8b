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
  # system packages the tests use, from Debian (as root, or with passwordless sudo): apt_install WHY PACKAGE...
  apt_install() {
    local why=$1; shift
    local SUDO=none
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    if [ "$SUDO" != none ] && command -v apt-get >/dev/null \
      && { $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$@" >/dev/null 2>&1; }; }; then
      echo "[setup] installed $* ($why)"
    else
      echo "[setup] $* missing and could not be installed (apt-get install $*): $why"
      return 1
    fi
  }
  # espeak-ng speaks the audio task (scripts/make_audio_task.py); without it tests use committed clips
  command -v espeak-ng >/dev/null || apt_install "speaks the audio task; continuing without it" espeak-ng || true
  # chromium + chromedriver: the viewer's browser test (tests/test_viewer.py) drives a real headless browser
  if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    apt_install "the viewer's browser test fails until they are (LLAVA_DEFT_SKIP_BROWSER=1 skips it)" chromium chromium-driver || true
  fi
  # fortunes: the default English text corpus of the seeds' text LMs (llava_deft/data/text_corpus.py)
  [ -d /usr/share/games/fortunes ] || apt_install "the default text corpus; tests/test_text_corpus.py needs it" fortunes || true
  touch "$stamp"
fi
