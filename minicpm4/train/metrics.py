"""Run metrics: one JSON object per optimizer step in OUT/metrics.jsonl, and a tqdm progress bar.

On resume the file keeps the records up to the checkpoint's step and drops later ones (written after the last
checkpoint by the interrupted run), so the file always holds one record per step of a single loss curve.

With a `tensorboard` directory the numeric fields also go there as scalars `train/<field>` at global step `step`
(torch.utils.tensorboard; the `tensorboard` package). On resume, events from the checkpoint's step on are purged
(SummaryWriter's purge_step), the same rule as for the JSONL file.
"""

from __future__ import annotations

import json
from pathlib import Path

from minicpm4.fileio import atomic_write_text
from minicpm4.train.guards import from_json_safe, json_safe


class MetricsLog:
    def __init__(self, path: Path, start_step: int, enabled: bool = True, tensorboard: Path | None = None):
        self.path, self.enabled, self._tb = path, enabled, None
        if not enabled:
            return
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(tensorboard), purge_step=start_step + 1 if start_step else None)
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # strict JSON, NaN spelled
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [from_json_safe(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm over optimizer steps (ETA from its rate); shown only on a terminal of rank 0."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=None if enabled else True)
