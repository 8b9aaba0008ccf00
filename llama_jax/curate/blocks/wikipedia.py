"""A MediaWiki XML dump (`pages-articles.xml[.bz2]`) as documents of plain text, markup stripped.

Only main-namespace pages (ns 0) that are not redirects are read. The stripping removes what is not
prose: comments, <ref>s and other tags, templates ({{...}}), tables ({|...|}), files and categories,
and keeps the visible text of links ([[target|text]] -> text) and of bold/italic and headings.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader

from llama_jax.curate.blocks.readers import open_source
from llama_jax.curate.errors import CurateError

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_FILE_OR_CATEGORY = re.compile(r"\[\[(?:File|Image|Category|Datei|Fichier):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                               re.IGNORECASE)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)


def _remove_nested(text: str, opening: str, closing: str) -> str:
    """Drop every (possibly nested) opening...closing span, e.g. {{ }} templates or {| |} tables."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_wikitext(wikitext: str) -> str:
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _FILE_OR_CATEGORY.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\2", text)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_dump(stream, where: str):
    """Yield (page id, title, plain text) for each article of the dump read from binary `stream`."""
    try:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local(element.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in element}
            revision = fields.get("revision")
            text = revision.find("{*}text") if revision is not None else None
            if (fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields
                    and text is not None and text.text):
                yield fields["id"].text, fields["title"].text or "", strip_wikitext(text.text)
            element.clear()
    except ET.ParseError as e:
        raise CurateError(f"{where}: not well-formed XML ({e})") from None


class WikipediaDumpReader(BaseDiskReader):
    name = "📚 Wikipedia dump"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with open_source(self.data_folder, filepath, "dump") as fh:
            for number, (page_id, title, text) in enumerate(parse_dump(fh, self.data_folder.resolve_paths(filepath))):
                if text:
                    yield self.get_document_from_dict({"id": f"wiki/{page_id}", "text": f"{title}\n\n{text}"},
                                                       filepath, number)
