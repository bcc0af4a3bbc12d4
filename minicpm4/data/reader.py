"""datatrove reader for JSONL / Parquet / plain text that never crashes on bad input.

datatrove's JsonlReader logs and skips a malformed line, skips empty documents silently, and stops
reading a file at its first non-UTF-8 byte. Here every bad record (see records.REASONS) is counted in
the step's stats as `bad_<reason>` and, when `rejects_writer` is set, written there with
`metadata.filter_reason`, so the run's report can say what was lost and why.
Documents get `id` = the record's own "id" field or `<relative path>:<line>` (`#<row>` for Parquet).
"""

from __future__ import annotations

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers.disk_base import DiskWriter

from minicpm4.data.records import open_binary, read_records


class CorpusReader(BaseDiskReader):
    name = "📚 corpus (jsonl/parquet/text)"

    def __init__(self, data_folder, paths_file=None, text_key: str = "text",
                 rejects_writer: DiskWriter | None = None, **kwargs):
        super().__init__(data_folder, paths_file=paths_file, text_key=text_key, add_file_path=False, **kwargs)
        self.rejects_writer = rejects_writer
        self._rank = 0

    def read_file(self, filepath: str) -> DocumentsPipeline:
        local = self.data_folder.is_local()
        with open_binary(self.data_folder.resolve_paths(filepath)) if local else \
                self.data_folder.open(filepath, "rb", compression="infer") as f:
            for rec in read_records(filepath, f, self.text_key):
                if rec.reason is not None:
                    self.stat_update(f"bad_{rec.reason}")
                    if self.rejects_writer:
                        raw = rec.meta.get("raw", "")
                        self.rejects_writer.write(Document(text=raw or "-", id=rec.where,
                                                           metadata={"filter_reason": rec.reason,
                                                                     "detail": rec.detail}), self._rank)
                    continue
                meta = dict(rec.meta)
                doc_id = meta.pop(self.id_key, None)
                yield Document(text=rec.text, id=str(doc_id) if doc_id is not None else rec.where,
                               metadata=meta | (self.default_metadata or {}))

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._rank = rank
        if self.rejects_writer is None:
            yield from super().run(data, rank, world_size)
            return
        with self.rejects_writer:
            yield from super().run(data, rank, world_size)
