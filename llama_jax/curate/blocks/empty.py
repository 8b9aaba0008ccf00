"""Drop documents a formatter emptied (a LaTeX source with no section, a file that was all header)."""
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter


class DropEmpty(BaseFilter):
    name = "🕳 drop empty"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return True if doc.text.strip() else (False, "empty")
