"""MkDocs hook: render the Sphinx roles of minilora's docstrings as plain code.

The docstrings say ``:class:`Tensor``` (readable in an editor and in ``help()``);
mkdocstrings would print the role's name literally, so drop it and keep the code span.
"""

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):(?=<code>)")


def on_page_content(html, **kwargs):
    return ROLE.sub("", html)
