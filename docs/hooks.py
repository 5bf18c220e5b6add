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
"""

import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):(?=<code>)")

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
    return files


def on_page_content(html, page, files, **kwargs):
    if page.file.src_uri.endswith(".ipynb"):
        start_here = get_relative_url(files.get_file_from_path("start-here.md").url, page.url)
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
