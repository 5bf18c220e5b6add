"""MkDocs hooks: the notebooks and the assignments' handouts as pages, and plain code for the
docstrings' Sphinx roles.

The handouts ship with the package (``minilora/course/handouts/``, so that every student copy
carries them, whatever the install); ``on_files`` shows them on the site as ``assignments/``.

The notebooks live in ``notebooks/`` (outside ``docs_dir``) and are stored without outputs.
``on_files`` adds them to the site, where mkdocs-jupyter (``mkdocs.yml``) executes each one while
the site builds and renders it with its outputs and figures; nothing executed is written back to
the repository. They run in the quick mode the test suite uses (``MINILORA_QUICK=1``) unless
the environment already chooses a mode: ``MINILORA_QUICK=0 mkdocs build`` renders the full runs.

The docstrings say ``:class:`Tensor``` (readable in an editor and in ``help()``);
mkdocstrings would print the role's name literally, so drop it and keep the code span.

Math is typeset by MathJax, served from the site itself: ``on_files`` copies MathJax's
``tex-chtml.js`` and its fonts from the installed ``mathjax`` package (the docs extra's
``django-static-mathjax``, MathJax's own files in a wheel; nothing of Django is used) to
``javascripts/mathjax/``. The pages write LaTeX between ``\\(`` ``\\)`` and in ``$$`` blocks
(pymdownx.arithmatex, generic mode); the notebooks' Markdown cells write ``$...$``.
mkdocs-jupyter would also load MathJax 2 from a CDN on each notebook page: that script is dropped,
and ``docs/javascripts/mathjax.js`` typesets the notebooks' Markdown cells as well.

mkdocs-jupyter builds a notebook's table of contents from its Markdown with every code span
removed, so "Writing an op: a `Function` with ..." became "Writing an op: a with ...", linking
to an anchor that does not exist. ``notebook_toc`` rebuilds it from the rendered headings.
"""

import html as html_module
import os
import re
from importlib.resources import files as package_files
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.structure.toc import get_toc
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):(?=<code>)")
# MathJax 3's CommonHTML build and the fonts it loads relative to itself
MATHJAX = Path(str(package_files("mathjax"))) / "static" / "mathjax" / "es5"
MATHJAX_FILES = [
    "tex-chtml.js",
    *(
        f"output/chtml/fonts/woff-v2/{p.name}"
        for p in sorted((MATHJAX / "output/chtml/fonts/woff-v2").glob("*.woff"))
    ),
]
# the CDN MathJax 2 (and its configuration) that mkdocs-jupyter's template puts on each page
CDN_MATHJAX = re.compile(
    r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*">\s*</script>'
    r'|<script type="text/x-mathjax-config">.*?</script>',
    re.S,
)
HEADING = re.compile(r'<h([1-6]) id="([^"]+)"[^>]*>(.*?)</h\1>', re.S)

# Set at import, before any kernel starts: each kernel inherits the build's environment.
os.environ.setdefault("MINILORA_QUICK", "1")
QUICK = os.environ["MINILORA_QUICK"] not in ("", "0")


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config, **kwargs):
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    for path in sorted((ROOT / "minilora" / "course" / "handouts").glob("*.md")):
        files.append(File.generated(config, f"assignments/{path.name}", abs_src_path=str(path)))
    for name in MATHJAX_FILES:
        files.append(
            File.generated(config, f"javascripts/mathjax/{name}", abs_src_path=str(MATHJAX / name))
        )
    return files


def on_page_content(html, page, files, **kwargs):
    if page.file.src_uri.endswith(".ipynb"):
        start_here = get_relative_url(files.get_file_from_path("start-here.md").url, page.url)
        html = CDN_MATHJAX.sub("", html)
        page.toc = notebook_toc(html)
        return notebook_banner(page.file.src_uri, start_here) + html
    return ROLE.sub("", html)


def notebook_banner(src_uri: str, start_here: str) -> str:
    """A note above each rendered notebook: where it comes from and how it was run."""
    name = src_uri.rsplit("/", 1)[-1]
    if QUICK:
        how = (
            "executed when this site was built, in the test suite's <em>quick mode</em> "
            "(<code>MINILORA_QUICK=1</code>: fewer steps on fewer examples), so its numbers "
            "are rough. Run it yourself for the full results"
        )
    else:
        how = "executed in full when this site was built"
    return (
        '<div class="admonition note"><p class="admonition-title">'
        f"This page is <code>notebooks/{name}</code></p>"
        f"<p>It was {how}: <code>jupyter lab notebooks/{name}</code> after the setup in "
        f'<a href="{start_here}">Start here</a>, which also says how long it takes.</p></div>\n'
    )


def notebook_toc(html: str):
    """The table of contents of a rendered notebook: its headings, nested by level, each with
    its whole text (code spans included) and the anchor it has on the page."""
    root = {"level": 0, "children": []}
    stack = [root]
    for level, anchor, inner in HEADING.findall(html):
        text = re.sub(r"<a class=\"anchor-link\".*?</a>|<[^>]+>", "", inner, flags=re.S)
        token = {
            "level": int(level),
            "id": anchor,
            "name": html_module.unescape(text).strip(),
            "children": [],
        }
        while stack[-1]["level"] >= token["level"]:
            stack.pop()
        stack[-1]["children"].append(token)
        stack.append(token)
    return get_toc(root["children"])
