"""Check rendered HTML pages in headless Chromium (Playwright driving Debian's chromium).

The checkers are plain functions so that the book test (tests/test_browser.py) and the
"bites" tests on the tiny fixture site (tests/fixtures/site/) run exactly the same code:

* :func:`serve` serves a folder on 127.0.0.1 (a free port) from a thread;
* :func:`open_browser` starts headless Chromium with a fresh profile;
* :func:`check_page` opens one page and returns its problems (JavaScript errors, formulas
  MathJax did not typeset, images that did not load) together with what it found (links,
  sidebar links, number of typeset formulas), and saves a screenshot;
* :func:`check_links` checks that every internal link of a page points to an existing
  file and, where it has a ``#fragment``, to an existing anchor of that page.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = "sudo apt-get install -y chromium"

# TeX that must not survive in the visible text of a page once MathJax has run
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\frac|\\begin\{|\\sqrt|\\hat|\\sum")


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 on a free port; yield the base URL (ends with /)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def open_browser():
    """Yield a Playwright browser context of headless Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,  # --user-data-dir: a fresh one per run
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class PageReport:
    url: str
    problems: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # absolute URLs of every <a href>
    sidebar_links: list[str] = field(default_factory=list)  # absolute URLs in the left sidebar
    formulas: int = 0  # typeset formulas (mjx-container elements)


_WAIT_FOR_MATHJAX = """
async () => {
  const mj = window.MathJax;
  if (!mj || !mj.startup) return mj ? "configured but not loaded" : "absent";
  await mj.startup.promise;
  return "typeset";
}
"""

_LOAD_IMAGES = """
async () => {
  const imgs = [...document.images];
  for (const img of imgs) img.loading = "eager";
  await Promise.all(imgs.map((img) => img.complete ? null : new Promise((resolve) => {
    img.addEventListener("load", resolve);
    img.addEventListener("error", resolve);
    setTimeout(resolve, 10000);
  })));
  return imgs.filter((img) => !(img.complete && img.naturalWidth > 0))
             .map((img) => img.getAttribute("src"));
}
"""

_INSPECT = """
() => {
  const skip = "pre, code, script, style, textarea, noscript, mjx-container, mjx-assistive-mml";
  const texts = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(skip)) continue;
    if (el.checkVisibility && !el.checkVisibility()) continue;
    if (node.textContent.trim()) texts.push(node.textContent);
  }
  const sidebar = document.querySelector(".bd-sidebar-primary, nav.bd-links");
  return {
    text: texts.join(" "),
    errors: [...document.querySelectorAll("mjx-merror, [data-mjx-error]")]
      .map((e) => e.getAttribute("data-mjx-error") || e.textContent),
    formulas: document.querySelectorAll("mjx-container").length,
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href),
    sidebar: sidebar ? [...sidebar.querySelectorAll("a[href]")].map((a) => a.href) : [],
  };
}
"""


def check_page(context, url: str, screenshot: Path | None = None) -> PageReport:
    """Open ``url`` in a new tab and report its problems (see the module docstring)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    report = PageReport(url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    messages: list[str] = []

    def on_console(message) -> None:
        where = message.location.get("url", "")
        # Chromium asks every new host for /favicon.ico; its 404 is not a problem of a page
        if message.type == "error" and not where.endswith("/favicon.ico"):
            messages.append(f"{message.text} [{where}]")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: messages.append(f"uncaught exception: {exc}"))
    page.on("requestfailed", lambda r: messages.append(f"request failed: {r.url} ({r.failure})"))
    try:
        response = page.goto(url, wait_until="load")
        if response is None or not response.ok:
            status = response.status if response else "no response"
            report.problems.append(f"HTTP status {status}")
            return report
        state = page.evaluate(_WAIT_FOR_MATHJAX)
        broken_images = page.evaluate(_LOAD_IMAGES)
        try:  # let late requests (fonts, images) finish; a page that keeps polling is no error
            page.wait_for_load_state("networkidle", timeout=10_000)
        except PlaywrightTimeoutError:
            pass
        found = page.evaluate(_INSPECT)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()

    report.problems += [f"JavaScript console error: {m}" for m in messages]
    report.problems += [f"image did not load: {src}" for src in broken_images]
    report.problems += [f"MathJax error: {e}" for e in found["errors"]]
    raw = sorted({m.group(0) for m in RAW_TEX.finditer(found["text"])})
    if raw:
        where = RAW_TEX.search(found["text"]).start()
        snippet = found["text"][max(0, where - 40) : where + 40].replace("\n", " ")
        report.problems.append(f"raw TeX {raw} in the visible text (MathJax {state}): …{snippet}…")
    report.links = found["links"]
    report.sidebar_links = found["sidebar"]
    report.formulas = found["formulas"]
    return report


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and (name == "id" or (tag == "a" and name == "name")):
                self.anchors.add(value)


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.anchors)


def local_target(root: Path, base_url: str, link: str) -> tuple[Path, str] | None:
    """The file under ``root`` and the fragment that ``link`` points to; None if external."""
    if not link.startswith(base_url):
        return None
    parts = urlsplit(link)
    path = root / unquote(parts.path).lstrip("/")
    if parts.path.endswith("/"):
        path = path / "index.html"
    return path, unquote(parts.fragment)


def check_links(root: Path, base_url: str, links: list[str]) -> list[str]:
    """Problems of the internal ``links`` (absolute URLs) of a page served from ``root``."""
    problems = []
    for link in sorted(set(links)):
        target = local_target(root, base_url, link)
        if target is None:
            continue  # external: the sandbox has no internet, and external sites are not ours
        path, fragment = target
        shown = link[len(base_url) - 1 :]
        if not path.is_file():
            problems.append(f"broken link: {shown} (no file {path.relative_to(root)})")
        elif fragment and path.suffix == ".html" and fragment not in anchors_of(path):
            problems.append(f"broken anchor: {shown} (no id {fragment!r} in that page)")
    return problems


def html_pages(root: Path) -> list[Path]:
    """Every HTML page of a built site (not the theme's static files or the sources)."""
    skip = {"_static", "_sources", "_images", "_downloads", "_mathjax", "mathjax"}
    return sorted(
        p for p in root.rglob("*.html") if not skip.intersection(p.relative_to(root).parts)
    )


REFRESH = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.IGNORECASE)


def redirect_target(path: Path) -> str | None:
    """The URL a ``<meta http-equiv="refresh">`` redirect page sends to, or None."""
    match = REFRESH.search(path.read_text(encoding="utf-8", errors="replace"))
    return match.group(1) if match else None
