"""A headless chromium driven by selenium, for the viewer's browser test and its screenshot script.

Needs the ``dev`` extra (selenium) and Debian's ``chromium`` + ``chromium-driver`` packages, which
``scripts/setup.sh`` installs. Selenium is pointed at the system chromedriver, so it never tries to
download a browser (these machines reach no browser download site).
"""

from __future__ import annotations

import shutil

__all__ = ["INSTALL_BROWSER", "BrowserMissingError", "find_browser", "headless_chrome"]

INSTALL_BROWSER = "apt-get install -y chromium chromium-driver (scripts/setup.sh runs it, with sudo -n when not root)"


class BrowserMissingError(RuntimeError):
    """chromium, chromedriver or selenium is not installed; the message says how to install it."""


def find_browser() -> tuple[str, str]:
    """(chromium binary, chromedriver) found on PATH, else :class:`BrowserMissingError` naming the command."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        raise BrowserMissingError(f"{' and '.join(missing)} not found on PATH; install them: {INSTALL_BROWSER}")
    return chromium, driver


def headless_chrome(width: int = 1400, height: int = 1100):
    """A selenium ``webdriver.Chrome`` on the system chromium, headless, ``width`` x ``height`` px."""
    chromium, driver = find_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissingError("selenium is not installed; install the dev extra: pip install -e '.[dev]'") from None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)
