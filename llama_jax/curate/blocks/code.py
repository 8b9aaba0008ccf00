"""GitHub files: the paper's line-length / alphanumeric heuristics, an extension whitelist, and the
license header (a leading comment block that reads like a license) stripped before dedup."""
from __future__ import annotations

import re
from pathlib import PurePosixPath

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter

from llama_jax.curate.config import GitHubRulesConfig

_TOKEN = re.compile(r"\S+")
_LICENSE_WORDS = re.compile(r"licen[cs]e|copyright|\(c\)|©|spdx-license-identifier|all rights reserved|"
                            r"warrant|redistribut", re.IGNORECASE)
# A leading comment block: /* ... */, or consecutive lines starting with #, //, --, ; or %.
_BLOCK_COMMENT = re.compile(r"\A\s*/\*.*?\*/[ \t]*\n?", re.DOTALL)
_LINE_COMMENTS = re.compile(r"\A(?:[ \t]*(?:#(?!!)|//|--|;|%)[^\n]*(?:\n|\Z))+")


def code_rule_failure(text: str, path: str, rules: GitHubRulesConfig) -> str | None:
    """The name of the first rule `text` (file `path`) breaks, or None when it passes them all."""
    if PurePosixPath(path).suffix.lower() not in rules.extensions:
        return "extension"
    lines = text.split("\n")
    if max(len(line) for line in lines) > rules.max_line_length:
        return "max_line_length"
    if sum(len(line) for line in lines) / len(lines) > rules.max_mean_line_length:
        return "mean_line_length"
    if sum(c.isalnum() for c in text) / max(len(text), 1) < rules.min_alphanumeric_share:
        return "alphanumeric_share"
    tokens = _TOKEN.findall(text)
    if not tokens or sum(c.isalpha() for c in text) / len(tokens) < rules.min_alpha_per_token:
        return "alpha_per_token"
    return None


class GitHubRulesFilter(BaseFilter):
    name = "🧑‍💻 GitHub rules"

    def __init__(self, rules: GitHubRulesConfig):
        super().__init__()
        self.rules = rules

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        failure = code_rule_failure(doc.text, str(doc.metadata.get(self.rules.path_field, "")), self.rules)
        return True if failure is None else (False, failure)


def strip_license_header(text: str) -> str:
    """`text` without its leading comment block when that block mentions a license or copyright
    (a shebang line, if any, stays first)."""
    shebang = ""
    if text.startswith("#!"):
        shebang, _, text = text.partition("\n")
        shebang += "\n"
    for pattern in (_BLOCK_COMMENT, _LINE_COMMENTS):
        match = pattern.match(text)
        if match and _LICENSE_WORDS.search(match.group(0)):
            return shebang + text[match.end():].lstrip("\n")
    return shebang + text


class LicenseHeaderStripper(BaseFormatter):
    name = "📜 license header"

    def format(self, text: str) -> str:
        return strip_license_header(text)
