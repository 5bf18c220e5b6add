"""MkDocs hooks: the notebooks and the assignments' handouts as pages, and plain code for the
docstrings' Sphinx roles.

The handouts ship with the package (``minilora/course/handouts/``, so that every student copy
carries them, whatever the install); ``on_files`` shows them on the site as ``assignments/``.

The notebooks live in ``notebooks/`` (outside ``docs_dir``), stored executed in full with their
outputs and figures (``python notebooks/regenerate.py`` writes them). ``on_files`` adds them to
the site, where mkdocs-jupyter (``mkdocs.yml``) renders them as stored, without running a cell.
Their markdown writes math as Jupyter and GitHub read it, ``$...$`` and ``$$...$$``; nbconvert
leaves it as text, so ``on_page_content`` wraps it the way ``pymdownx.arithmatex`` (generic mode)
wraps the math of the pages in ``docs/``, and the site's one math script typesets both.

The docstrings say ``:class:`Tensor``` (readable in an editor and in ``help()``);
mkdocstrings would print the role's name literally, so drop it and keep the code span.

The site's one math script is MathJax 3, served from the site itself: ``on_files`` copies
MathJax's ``tex-chtml.js`` and its fonts from the installed ``mathjax`` package (the docs
extra's ``django-static-mathjax``, MathJax's own files in a wheel; nothing of Django is used) to
``javascripts/mathjax/``, and ``docs/javascripts/mathjax.js`` configures it to typeset the
arithmatex markup only. mkdocs-jupyter's template would also load MathJax 2 from a CDN on each
notebook page: that script and its configuration are dropped.

mkdocs-jupyter builds a notebook's table of contents from its Markdown with every code span
removed, so "Writing an op: a `Function` with ..." became "Writing an op: a with ...", linking
to an anchor that does not exist. ``notebook_toc`` rebuilds it from the rendered headings.
"""

import html as html_module
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

# A markdown cell as mkdocs-jupyter renders it; inside it, code (left alone) and math.
MARKDOWN_CELL = re.compile(r'(<div class="[^"]*\bjp-RenderedMarkdown\b[^>]*>)(.*?)(</div>)', re.S)
CODE = re.compile(r"(<code>.*?</code>|<pre>.*?</pre>)", re.S)
DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE_MATH = re.compile(r"\$([^$]+?)\$")


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
        return notebook_banner(page.file.src_uri, start_here) + arithmatex_markup(html)
    return ROLE.sub("", html)


def arithmatex_markup(html: str) -> str:
    """``$$x$$`` and ``$x$`` in the notebook's markdown cells, outside code, as arithmatex's
    generic output writes math: ``<span class="arithmatex">\\[x\\]</span>`` and ``\\(x\\)``."""

    def math(text: str) -> str:
        text = DISPLAY_MATH.sub(lambda m: f'<span class="arithmatex">\\[{m[1]}\\]</span>', text)
        return INLINE_MATH.sub(lambda m: f'<span class="arithmatex">\\({m[1]}\\)</span>', text)

    def cell(m: re.Match) -> str:
        parts = CODE.split(m[2])  # odd indices: code
        body = "".join(part if i % 2 else math(part) for i, part in enumerate(parts))
        return m[1] + body + m[3]

    return MARKDOWN_CELL.sub(cell, html)


def notebook_banner(src_uri: str, start_here: str) -> str:
    """A note above each rendered notebook: where it comes from and how it was run."""
    name = src_uri.rsplit("/", 1)[-1]
    return (
        '<div class="admonition note"><p class="admonition-title">'
        f"This page is <code>notebooks/{name}</code></p>"
        "<p>It shows the outputs stored in the repository, from a full run "
        "(<code>python notebooks/regenerate.py</code>); timings depend on the machine that ran it. "
        f"Run it yourself: <code>jupyter lab notebooks/{name}</code> after the setup in "
        f'<a href="{start_here}">Start here</a>, which also says how long it takes, or open it in '
        "Colab or Binder, where its first cell installs minilora.</p></div>\n"
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
