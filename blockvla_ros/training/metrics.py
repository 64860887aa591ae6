"""Training metrics: one JSON object per line (metrics.jsonl) and a loss-curve PNG at the end."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Optional

from ..io.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to a JSONL file. On resume, records after the resumed step are dropped first, so the file
    holds one continuous curve."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list = []  # this invocation's records
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, '')
        elif self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get('step', 0) <= resume_step]
            atomic_write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def read_metrics(path: str | Path) -> list:
    """The records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning('%s: ignoring a malformed line: %.80s', path, line)
    return out


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = '') -> Optional[Path]:
    """Train loss (and validation loss) against the step, from metrics.jsonl; written atomically."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    train = [(r['step'], r['loss']) for r in records if r.get('split') == 'train' and r.get('loss') is not None]
    val = [(r['step'], r['val_loss']) for r in records if r.get('split') == 'val' and r.get('val_loss') is not None]
    if not train and not val:
        log.warning('no loss records in %s: no loss curve written', metrics_path)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label='train loss', lw=1.2)
    if val:
        ax.plot(*zip(*val), 'o-', label='validation loss', lw=1.5, ms=3)
    ax.set_xlabel('optimizer step')
    ax.set_ylabel('cross-entropy')
    if all(v > 0 for _, v in train + val):
        ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)
