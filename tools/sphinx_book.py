"""Small Sphinx fixes for the book (loaded through `sphinx.local_extensions` in _config.yml).

* Jupyter Book 1.0.4 with Sphinx 7.4 writes every script that an extension adds as inline
  code at `builder-inited` time twice into each page (once registered with filename ``''``,
  once with ``None``). For sphinx-thebe's ``const THEBE_JS_URL = ...`` the second copy is
  a JavaScript error on every page ("Identifier 'THEBE_JS_URL' has already been declared"),
  which the browser test (tests/test_browser.py) catches. Drop the duplicates.
* autodoc lists a NamedTuple's fields as members that only say "Alias for field number N";
  the class docstring already documents them. Skip those.
* MathJax 3 is served by the book itself, not a CDN, so formulas typeset offline. When an
  HTML build finishes, the es5/ files of the pinned django-static-mathjax package are copied
  to ``_static/mathjax/`` (``mathjax_path`` in _config.yml points there). The build itself
  does it, so Jupyter Book's own ``jupyter-book build .`` gives the same book as ``make book``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.errors import ExtensionError


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        key = (
            getattr(script, "filename", str(script)) or "",
            tuple(sorted((k, str(v)) for k, v in attributes.items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def mathjax_source() -> Path:
    """The es5/ folder of MathJax 3 in the installed django-static-mathjax package."""
    try:
        import mathjax  # django-static-mathjax
    except ImportError as exc:
        raise ExtensionError(
            "the book serves MathJax from the django-static-mathjax package, which is not "
            "installed: pip install -r requirements.txt"
        ) from exc
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(mathjax_source(), target, dirs_exist_ok=True)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
