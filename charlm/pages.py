"""What the two self-contained pages share (the model page, python -m charlm.export format=html;
the reading page, evaluate.py html=FILE): data embedded so that nothing in it can start markup,
and a Content-Security-Policy that lets only the page's own script run, named by its hash."""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from typing import Any

# The page's own code: inline <script> elements without a type (the data blocks have one, and a
# browser runs none of them).
_CODE = re.compile(r"<script>(.*?)</script>", re.S)


def embed(value: Any) -> str:
    """value as JSON for a <script type="application/json"> block: every <, > and & written as a
    \\u escape, so a title or a text holding `</script>` or `<!--` cannot end or bend the block."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fill(template: str, title: str, **blocks: str) -> str:
    """The template with {{TITLE}} (escaped as text), each {{NAME}} block as given (embed()'s output,
    or base64), and {{CSP}} set to a policy that allows only the template's own scripts."""
    page = template.replace("{{TITLE}}", html.escape(title))
    for name, value in blocks.items():
        page = page.replace("{{" + name + "}}", value)
    return page.replace("{{CSP}}", policy(template))


def policy(page: str) -> str:
    """default-src 'none'; the inline scripts by their SHA-256; inline styles (they run nothing)."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()}'"
                      for code in _CODE.findall(page))
    return f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:"
