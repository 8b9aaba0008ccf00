"""The curation blocks datatrove has no equivalent for, each on a hand-made input whose right answer is
known by construction: GitHub rules, license headers, book overlap, LaTeX, StackExchange, Wikipedia
markup, CCNet normalisation and the mixture's proportions."""
from __future__ import annotations

import io
import random
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.curate.config import BookDedupConfig, GitHubRulesConfig

RULES = GitHubRulesConfig()
GOOD_CODE = "def add(first, second):\n    return first + second\n"


@pytest.mark.parametrize("text,path,failure", [
    (GOOD_CODE, "src/add.py", None),
    (GOOD_CODE, "bin/add.exe", "extension"),
    (GOOD_CODE * 10 + "x" * 1001 + "\n", "a.py", "max_line_length"),
    (GOOD_CODE * 10 + "x" * 1000 + "\n", "a.py", None),  # 1000 is allowed (mean line: 66)
    ("\n".join(["abcdefghij " * 10 + "k"] * 5), "a.py", "mean_line_length"),  # 111-character lines
    ("x = {[(<>)]};;;; ||| &&& ^^^ ~~~ !!!\n" * 3, "a.py", "alphanumeric_share"),
    ("a = 1 + 2 - 3 * 4 / 5 % 6\n" * 3, "a.py", "alpha_per_token"),
])
def test_github_rules(text, path, failure):
    from llama_jax.curate.blocks.code import code_rule_failure

    assert code_rule_failure(text, path, RULES) == failure


def test_license_header_stripped_and_other_comments_kept():
    from llama_jax.curate.blocks.code import strip_license_header

    licensed = "#!/usr/bin/env python\n# Copyright 2020 Someone\n# Licensed under the MIT License.\n\nimport os\n"
    assert strip_license_header(licensed) == "#!/usr/bin/env python\nimport os\n"
    block = "/*\n * SPDX-License-Identifier: Apache-2.0\n */\nint main() { return 0; }\n"
    assert strip_license_header(block) == "int main() { return 0; }\n"
    plain = "# Adds two numbers.\ndef add(a, b):\n    return a + b\n"
    assert strip_license_header(plain) == plain


def _book(words: list[str]) -> str:
    return " ".join(words)


@pytest.mark.parametrize("shared,dropped", [(894, False), (914, True)])
def test_books_dedup_at_90_percent(shared, dropped):
    """Two 1004-word books sharing their first `shared` words share (shared - 4) of their 1000 word
    5-grams: 89% (both kept) or 91% (the copy dropped)."""
    from llama_jax.curate.blocks.books import books_to_drop

    original = [f"w{i}" for i in range(1004)]
    copy = original[:shared] + [f"other{i}" for i in range(1004 - shared)]
    other = [f"z{i}" for i in range(1004)]
    books = [("a", _book(original)), ("b", _book(copy)), ("c", _book(other))]
    assert books_to_drop(books, BookDedupConfig()) == ({"b"} if dropped else set())


def test_books_dedup_keeps_the_longer_book():
    from llama_jax.curate.blocks.books import books_to_drop

    words = [f"w{i}" for i in range(2000)]
    assert books_to_drop([("short", _book(words[:1500])), ("long", _book(words))], BookDedupConfig()) == {"short"}


LATEX = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\def\eps{\varepsilon}
\newcommand{\norm}[1]{\lVert #1 \rVert}
\title{A paper}
\begin{document}
\maketitle
\section{Introduction}
Let $x \in \R$ and $\eps > 0$. % a comment to drop
We keep 50\% of \norm{x}.
\begin{thebibliography}{9}
\bibitem{a} Someone. A book.
\end{thebibliography}
\end{document}
"""


def test_latex_cleanup():
    from llama_jax.curate.blocks.latex import clean_latex

    assert clean_latex(LATEX) == ("\\section{Introduction}\nLet $x \\in \\mathbb{R}$ and $\\varepsilon > 0$. \n"
                                  "We keep 50\\% of \\norm{x}.")
    assert clean_latex("\\documentclass{article}\nno sections at all\n") == ""


POSTS = b"""<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" Score="5" Title="How do I &lt;b&gt;sort&lt;/b&gt;?" Body="&lt;p&gt;I have a &lt;code&gt;list&lt;/code&gt;.&lt;/p&gt;" />
  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;Low answer&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="1" Score="10" Body="&lt;p&gt;Use &lt;code&gt;sorted()&lt;/code&gt; &amp;amp; done&lt;/p&gt;&lt;script&gt;x()&lt;/script&gt;" />
  <row Id="4" PostTypeId="2" ParentId="99" Score="3" Body="orphan" />
  <row Id="5" PostTypeId="1" Score="0" Title="Second" Body="&lt;p&gt;Body two&lt;/p&gt;" />
</posts>
"""


def test_stackexchange_question_then_answers_by_score():
    from llama_jax.curate.blocks.stackexchange import parse_posts

    records, orphans = parse_posts(io.BytesIO(POSTS), "Posts.xml")
    assert orphans == 1
    assert [r["id"] for r in records] == ["q1", "q5"]
    assert records[0]["text"] == "How do I sort?\n\nI have a list.\n\nUse sorted() & done\n\nLow answer"
    assert records[1]["text"] == "Second\n\nBody two"


@pytest.mark.parametrize("xml,message", [
    (b"<posts><row Id='1' PostTypeId='1'", "not well-formed XML"),
    (b"<users><row Id='1'/></users>", "expected <posts>"),
    (b"<posts><row Id='x' PostTypeId='1'/></posts>", "Id='x' is not an integer"),
    (b"", "not well-formed XML"),
])
def test_stackexchange_bad_files_name_the_file(xml, message):
    from llama_jax.curate.blocks.stackexchange import parse_posts
    from llama_jax.curate.errors import CurateError

    with pytest.raises(CurateError, match=f"^dump/Posts.xml: .*{message}"):
        parse_posts(io.BytesIO(xml), "dump/Posts.xml")


WIKITEXT = """{{Infobox animal|name=Llama}}
'''Llamas''' are [[Camelid|camelids]] from [[South America]].<ref>Some book</ref>
== Diet ==
They eat grass.<!-- hidden -->
{| class="wikitable"
| a || b
|}
[[File:Llama.jpg|thumb|A [[llama]]]]
See [https://example.org the site].
[[Category:Camelids]]"""
WIKI = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Llama</title><ns>0</ns><id>7</id><revision><text>{escape(WIKITEXT)}</text></revision></page>
<page><title>Talk:Llama</title><ns>1</ns><id>8</id><revision><text>talk page</text></revision></page>
<page><title>Lama</title><ns>0</ns><id>9</id><redirect title="Llama"/><revision><text>#REDIRECT [[Llama]]</text></revision></page>
</mediawiki>"""


def test_wikipedia_markup_stripped_and_only_articles_read():
    from llama_jax.curate.blocks.wikipedia import parse_dump

    pages = list(parse_dump(io.BytesIO(WIKI.encode()), "dump.xml"))
    assert pages == [("7", "Llama", "Llamas are camelids from South America.\nDiet\nThey eat grass.\n\nSee the site.")]


@pytest.mark.parametrize("reader", ["wikipedia", "stackexchange"])
def test_a_truncated_compressed_dump_is_one_error_naming_it(tmp_path, reader):
    """A .gz dump cut short (a partial download) fails while it is read, with EOFError from gzip: one
    CurateError naming the file, as for an unreadable JSONL shard, not the EOFError's traceback."""
    import gzip

    from llama_jax.curate.blocks.stackexchange import StackExchangeReader
    from llama_jax.curate.blocks.wikipedia import WikipediaDumpReader
    from llama_jax.curate.errors import CurateError

    xml, close = (WIKI, "</mediawiki>") if reader == "wikipedia" else (POSTS.decode(), "</posts>")
    noise = "".join(random.Random(0).choices("abcdefgh ", k=200_000))  # cut inside a comment: well-formed so far
    whole = gzip.compress(xml.replace(close, f"<!-- {noise} -->{close}").encode())
    (tmp_path / "dump.xml.gz").write_bytes(whole[: len(whole) // 2])
    block = (WikipediaDumpReader if reader == "wikipedia" else StackExchangeReader)(str(tmp_path))
    with pytest.raises(CurateError, match=rf"^{tmp_path / 'dump.xml.gz'}: unreadable dump \(Compressed file ended"):
        list(block.read_file("dump.xml.gz"))


def test_ccnet_normalisation():
    from llama_jax.curate.normalize import normalize_line, normalized_lines

    assert normalize_line("  Café “Über” — 2024 Edition\u00a0!  ") == 'cafe "uber" - 0000 edition !'
    assert normalized_lines("A\n\n  \nB 7") == ["a", "b 0"]


def _ccnet_normalize_every_character(line: str) -> str:
    """The oracle: CCNet's normalisation with every character through NFD and its Unicode category."""
    import re
    import unicodedata

    from llama_jax.curate.normalize import _PUNCTUATION

    line = line.lower().translate(_PUNCTUATION)
    line = "".join(c for c in unicodedata.normalize("NFD", line)
                   if unicodedata.category(c) not in ("Mn", "Cc", "Cf", "Co", "Cs"))
    return re.sub(r"\s+", " ", re.sub(r"\d", "0", line)).strip()


@settings(max_examples=500, deadline=None)
@given(line=st.text(max_size=40) | st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_ascii_fast_path_normalises_as_every_character_would(line):
    """ASCII lines skip NFD and the per-character category test: the same result as the full path."""
    from llama_jax.curate.normalize import normalize_line

    assert normalize_line(line) == _ccnet_normalize_every_character(line)


def test_mixture_shares_match_weights_within_one_percent():
    """Random-length documents in three sources; the selected tokens per source, counted here from the
    shards, match the normalised weights within 1%, and no source is read more often than its epochs."""
    from llama_jax.curate.mixture import Doc, interleave_into_shards, plan_mixture

    rng = random.Random(0)
    sources = {name: [Doc(name, f"{name} {i}", rng.randint(50, 500)) for i in range(n)]
               for name, n in (("web", 3000), ("wiki", 200), ("code", 400))}
    weights, epochs = {"web": 0.67, "wiki": 0.045, "code": 0.045}, {"web": 1.1, "wiki": 2.45, "code": 0.64}
    plan = plan_mixture(sources, weights, epochs)
    shards = interleave_into_shards(plan["selected"], 20_000, seed=1)
    tokens = {name: 0 for name in sources}
    for shard in shards:
        for doc in shard:
            tokens[doc.source] += doc.tokens
    total = sum(tokens.values())
    for name, weight in weights.items():
        assert abs(tokens[name] / total - weight / sum(weights.values())) < 0.01, (name, tokens)
        available = sum(d.tokens for d in sources[name])
        assert tokens[name] <= available * epochs[name] * 1.01
    assert all(sum(d.tokens for d in shard) < 20_000 + 500 for shard in shards)
