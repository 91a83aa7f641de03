"""The built book renders in a real browser, and the browser checks bite.

Run by `make test` after the book build (`pytest -m browser`). Needs Debian's chromium
(`/usr/bin/chromium`, or $CHROMIUM); without it the tests skip with the command that
installs it, except in CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import browser
import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
FIXTURE_SITE = Path(__file__).resolve().parent / "fixtures" / "site"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
APPENDIX = "Appendix"  # the _toc.yml part whose pages need not contain formulas


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def context():
    if not browser.chromium_available():
        _unavailable(
            f"no Chromium at {browser.CHROMIUM}: install it with `{browser.INSTALL_HINT}` "
            "(or set CHROMIUM=/path/to/chromium) to run the browser test"
        )
    with browser.open_browser() as ctx:
        yield ctx


# ---------------------------------------------------------------------------- the book


def toc_pages() -> tuple[list[str], list[str]]:
    """(chapters, appendix pages) of _toc.yml, as docnames such as 'book/intro'."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    chapters, appendix = [toc["root"]], []

    def walk(entries, into):
        for entry in entries or []:
            if "file" in entry:
                into.append(entry["file"].removesuffix(".md").removesuffix(".ipynb"))
            walk(entry.get("sections"), into)

    walk(toc.get("chapters"), chapters)
    for part in toc.get("parts", []):
        walk(part.get("chapters"), appendix if part.get("caption") == APPENDIX else chapters)
    return chapters, appendix


BOOK_PAGES = browser.html_pages(SITE) if SITE.is_dir() else []


@pytest.fixture(scope="module")
def book_url():
    with browser.serve(SITE) as url:
        yield url


def test_book_is_built() -> None:
    if not (SITE / "index.html").is_file():
        _unavailable("no _build/html/index.html: run `make book` (make test builds it first)")
    chapters, appendix = toc_pages()
    for docname in chapters + appendix:
        assert (SITE / f"{docname}.html").is_file(), f"{docname} of _toc.yml was not built"


@pytest.mark.parametrize("page", BOOK_PAGES, ids=lambda p: str(p.relative_to(SITE)))
def test_book_page_renders(page: Path, context, book_url: str) -> None:
    relative = page.relative_to(SITE).as_posix()
    redirect = browser.redirect_target(page)
    if redirect is not None:  # index.html: a meta-refresh to the landing page
        target = (page.parent / redirect.split("#")[0]).resolve()
        assert target.is_file(), f"{relative} redirects to missing {redirect}"
        return
    report = browser.check_page(
        context, book_url + relative, SCREENSHOTS / relative.replace(".html", ".png")
    )
    problems = report.problems + browser.check_links(SITE, book_url, report.links)

    docname = relative.removesuffix(".html")
    chapters, appendix = toc_pages()
    if docname in chapters and report.formulas == 0:
        problems.append("a chapter without a single typeset formula")
    if docname in chapters + appendix:  # the sidebar lists every page of _toc.yml
        sidebar = {link.split("#")[0] for link in report.sidebar_links}
        for other in chapters[1:] + appendix:  # the root is the home link, not a sidebar entry
            if book_url + other + ".html" not in sidebar:
                problems.append(f"the sidebar does not list {other}")
    assert not problems, f"{relative}:\n  " + "\n  ".join(problems)


# ------------------------------------------------------ the checks bite (fixture site)


@pytest.fixture(scope="module")
def fixture_site(tmp_path_factory) -> Path:
    """tests/fixtures/site plus the book's local MathJax, in a temporary folder."""
    import mathjax  # django-static-mathjax: MathJax 3 under mathjax/static/mathjax/es5

    site = tmp_path_factory.mktemp("site")
    shutil.copytree(FIXTURE_SITE, site, dirs_exist_ok=True)
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    (site / "mathjax").symlink_to(es5, target_is_directory=True)
    return site


def _check_fixture(name: str, context, site: Path) -> list[str]:
    with browser.serve(site) as url:
        report = browser.check_page(context, url + name)
        return report.problems + browser.check_links(site, url, report.links)


def test_good_fixture_page_passes(context, fixture_site: Path) -> None:
    assert _check_fixture("good.html", context, fixture_site) == []


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("broken_formula.html", "MathJax error"),
        ("untypeset_formula.html", "raw TeX"),
        ("missing_image.html", "image did not load: missing.png"),
        ("broken_link.html", "broken link: /no-such-page.html"),
        ("broken_anchor.html", "broken anchor: /good.html#no-such-section"),
        ("js_error.html", "JavaScript console error"),
    ],
)
def test_broken_fixture_page_is_rejected(page, expected, context, fixture_site: Path) -> None:
    problems = _check_fixture(page, context, fixture_site)
    assert any(expected in p for p in problems), problems


def test_api_page_documents_every_public_name() -> None:
    api = SITE / "book" / "api.html"
    if not api.is_file():
        _unavailable("no _build/html/book/api.html: run `make book`")
    import bnlib.functional
    import bnlib.nn

    anchors = browser.anchors_of(api)
    for module in (bnlib.functional, bnlib.nn):
        for name in module.__all__:
            assert f"{module.__name__}.{name}" in anchors, f"{name} is not on the API page"
