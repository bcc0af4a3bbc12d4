"""JSONL writer whose files appear only complete: written as `<name>.part`, renamed when the task ends.

A task killed mid-way leaves a `.part` file (never mistaken for output); its rerun opens the same
`.part` for writing ("wb" truncates) and renames it at the end, so a resumed run neither duplicates
nor loses documents. Renaming happens only when the step exits without an exception.
"""

from __future__ import annotations

from datatrove.pipeline.writers.jsonl import JsonlWriter

PART = ".part"


class AtomicJsonlWriter(JsonlWriter):
    name = "🐿 Jsonl (atomic)"

    def __init__(self, output_folder, output_filename: str = "${rank}.jsonl", **kwargs):
        super().__init__(output_folder, output_filename=output_filename, compression=None, **kwargs)

    def _get_output_filename(self, document, rank=0, **kwargs) -> str:
        return super()._get_output_filename(document, rank, **kwargs) + PART

    def __exit__(self, exc_type, exc_val, exc_tb):
        names = list(self.output_mg.get_open_files())
        self.close()
        if exc_type is None:
            for name in names:
                self.output_folder.mv(name, name.removesuffix(PART))
