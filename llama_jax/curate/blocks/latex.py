"""arXiv LaTeX cleanup as in the paper: drop everything before the first section, comments and the
bibliography, and expand the paper's own argument-free macros (\\newcommand / \\def) inline."""
from __future__ import annotations

import re

from datatrove.pipeline.formatters.base import BaseFormatter

_SECTION = re.compile(r"\\(?:section|chapter)\*?\s*[\[{]")
_COMMENT = re.compile(r"(?<!\\)%[^\n]*")
_BIBLIOGRAPHY = re.compile(r"\\begin\{thebibliography\}.*?(?:\\end\{thebibliography\}|\Z)|"
                           r"\\bibliography\{[^}]*\}|\\bibliographystyle\{[^}]*\}|\\printbibliography\b",
                           re.DOTALL)
_END_DOCUMENT = re.compile(r"\\end\{document\}.*\Z", re.DOTALL)
_NAME = r"\\([A-Za-z]+)"


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the balanced {...} group opening at `start` (after spaces), and the index after it."""
    while start < len(text) and text[start] in " \t\n":
        start += 1
    if start >= len(text) or text[start] != "{":
        return None
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":  # an escaped character (\{, \}) never opens or closes a group
            i += 2
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def macro_definitions(text: str) -> dict[str, str]:
    """Argument-free macros: \\newcommand{\\x}{body}, \\renewcommand, \\providecommand, \\def\\x{body}.
    Macros with arguments ([n]) are left alone (their uses stay as written)."""
    macros = {}
    for match in re.finditer(r"\\(?:re)?(?:newcommand|providecommand)\*?\s*\{?\s*" + _NAME + r"\s*\}?", text):
        body = _braced(text, match.end())
        if body is not None:
            macros[match.group(1)] = body[0]
    for match in re.finditer(r"\\def\s*" + _NAME + r"(?=\s*\{)", text):
        body = _braced(text, match.end())
        if body is not None:
            macros[match.group(1)] = body[0]
    return macros


def expand_macros(text: str, macros: dict[str, str], max_rounds: int = 5) -> str:
    """Replace each use of a macro by its body; bodies that use other macros expand too (bounded, so a
    self-referencing macro cannot loop)."""
    if not macros:
        return text
    use = re.compile(_NAME + r"(?![A-Za-z])")
    for _ in range(max_rounds):
        expanded = use.sub(lambda m: macros.get(m.group(1), m.group(0)), text)
        if expanded == text:
            break
        text = expanded
    return text


def clean_latex(source: str) -> str:
    """The paper text of a LaTeX source: "" when it has no section at all."""
    source = _COMMENT.sub("", source)
    macros = macro_definitions(source)
    first = _SECTION.search(source)
    if first is None:
        return ""
    body = _END_DOCUMENT.sub("", source[first.start():])
    body = _BIBLIOGRAPHY.sub("", body)
    body = expand_macros(body, macros)
    return re.sub(r"\n{3,}", "\n\n", body).strip()


class LatexCleaner(BaseFormatter):
    name = "📄 LaTeX cleanup"

    def format(self, text: str) -> str:
        return clean_latex(text)
