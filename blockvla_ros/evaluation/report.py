"""Replay results -> report.json (every figure) and report.md (tables side by side), written atomically."""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from blockvla_ros.evaluation import metrics
from blockvla_ros.evaluation.replay import BagEpisodes, EpisodeReplay, ReplaySettings, VariantReplay
from blockvla_ros.io.atomic import atomic_write_text

NO_ERROR = 'no recorded actions: error not computed'


def summarize(episodes: list[EpisodeReplay], names: list[str], horizon: int, rate_hz: float) -> dict[str, Any]:
    """Pooled figures over ``episodes`` (every compared pair counts once)."""
    dim = len(names)
    errors = metrics.ErrorStats(horizon, dim)
    executed = metrics.ErrorStats(horizon, dim)
    seams = metrics.SeamStats(dim)
    with_actions = [ep for ep in episodes if ep.errors is not None]
    for ep in with_actions:
        errors = errors.merge(ep.errors)
        executed = executed.merge(ep.executed_errors)
    for ep in episodes:
        seams = seams.merge(ep.seams)

    def cat(get):
        parts = [np.asarray(get(ep), dtype=np.float64).reshape(-1) for ep in episodes]
        return np.concatenate(parts) if parts else np.zeros(0)

    def latency(key):
        values = cat(lambda ep: ep.latency_ms[key])
        return metrics.percentiles(values[np.isfinite(values)])

    ticks = sum(ep.n_ticks for ep in episodes)
    out: dict[str, Any] = {
        'episodes': len(episodes),
        'ticks': int(ticks),
        'recorded_s': ticks / rate_hz,
        'chunks': int(sum(len(ep.starts) for ep in episodes)),
        'errors': None,
        'executed_errors': None,
        'error_note': '',
        'seam_jump': metrics.seam_summary(seams, names),
        'latency_ms': {k: latency(k) for k in ('total', 'prefill', 'decode', 'wall')},
        'nfe': metrics.count_summary(cat(lambda ep: ep.nfe)),
        'calls': metrics.count_summary(cat(lambda ep: ep.calls)),
        'actions_clipped': int(sum(ep.clipped for ep in episodes)),
    }
    if with_actions and errors.count:
        out['errors'] = metrics.error_summary(errors, names)
        out['executed_errors'] = metrics.error_summary(executed, names)
        if len(with_actions) < len(episodes):
            out['error_note'] = (f'errors from {len(with_actions)} of {len(episodes)} episodes; '
                                 f'the others have no recorded actions')
    else:
        out['error_note'] = NO_ERROR
    return out


def build_report(variants: list[VariantReplay], bags: list[BagEpisodes], settings: ReplaySettings,
                 read_s: float, wall_s: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready report: settings, bags, and per variant the overall and per-bag figures.

    ``wall_s``: the whole run (default: reading plus every variant's prediction time, no overlap)."""
    bag_list = []
    for bag in bags:
        bag_list.append({
            'path': bag.path,
            'topics': bag.topics or None,  # only listed for bags without recorded actions
            'no_actions_reason': bag.no_actions_reason or None,
            'episodes': [dict(info) for info in bag.infos],
        })
    out_variants = []
    for v in variants:
        s = settings.resolve(v.horizon)
        per_bag = {bag.path: summarize([e for e in v.episodes if e.bag_path == bag.path], v.action_names,
                                       v.horizon, s.rate_hz) for bag in bags}
        out_variants.append({
            'label': v.label,
            'policy': v.description,
            'action_names': v.action_names,
            'horizon': v.horizon,
            'execute_steps': s.execute_steps,
            'overall': summarize(v.episodes, v.action_names, v.horizon, s.rate_hz),
            'per_bag': per_bag,
            'speed': {'recorded_s': v.recorded_s, 'replay_wall_s': v.wall_s, 'realtime_factor': v.realtime_factor},
        })
    recorded = sum(v.recorded_s for v in variants)
    wall = wall_s if wall_s is not None else read_s + sum(v.wall_s for v in variants)
    report = {
        'tool': 'blockvla-replay',
        'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
        'settings': {'rate_hz': settings.rate_hz, 'execute_steps': settings.execute_steps,
                     'known_steps': settings.known_steps,
                     'action_limits': None if settings.limits is None else
                     {'lower': settings.limits.lower.tolist(), 'upper': settings.limits.upper.tolist()}},
        'bags': bag_list,
        'variants': out_variants,
        'speed': {'read_s': read_s, 'total_wall_s': wall, 'recorded_s': recorded,
                  'realtime_factor': recorded / wall if wall > 0 else None},
        'plots': [],
    }
    report.update(extra or {})
    return report


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f'not JSON serializable: {type(value).__name__}')


def _clean(value):
    """NaN / inf -> None so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: str | Path) -> None:
    text = json.dumps(_clean(json.loads(json.dumps(report, default=_json_default))), indent=2, allow_nan=False)
    atomic_write_text(path, text + '\n')


# --- markdown --------------------------------------------------------------------------------------------
def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return '-'
    if isinstance(x, int):
        return str(x)
    return f'{x:.{digits}g}'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return lines + ['']


def _dig(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def render_markdown(report: dict[str, Any]) -> str:
    """Side-by-side tables: one column per variant."""
    variants = report['variants']
    labels = [v['label'] for v in variants]
    s = report['settings']
    md = ['# Offline replay report', '',
          f'Created {report["created"]} by `{report["tool"]}`. Control rate {s["rate_hz"]:g} Hz, a new chunk every '
          f'{s["execute_steps"] or "H"} ticks, {s["known_steps"]} known (real-time chunking) steps. Errors are in '
          'the physical units of each action dimension. Open-loop figures are regression signals, not success '
          'rates.', '']
    md += ['## Bags', '']
    rows = []
    for bag in report['bags']:
        ticks = sum(e['ticks'] for e in bag['episodes'])
        rows.append([f'`{bag["path"]}`', str(len(bag['episodes'])), str(ticks),
                     'yes' if not bag['no_actions_reason'] else f'no: {bag["no_actions_reason"]}'])
    md += _table(['bag', 'episodes', 'ticks', 'recorded actions'], rows)

    md += ['## Overall', '']
    md += _overall_table(variants, labels, lambda v: v['overall'])
    names = variants[0]['action_names'] if variants else []
    if any(v['overall']['errors'] for v in variants):
        md += ['### Per dimension (every chunk step vs the recorded action)', '']
        rows = []
        for n in names:
            row = [n]
            for v in variants:
                pd = _dig(v['overall'], 'errors', 'per_dim', n) or {}
                row.append(f'{_f(pd.get("mae"))} / {_f(pd.get("mse"))}')
            rows.append(row)
        md += _table(['dimension'] + [f'{lab} MAE / MSE' for lab in labels], rows)
        md += ['### MAE against horizon step (mean over dimensions)', '']
        horizon = max(v['horizon'] for v in variants)
        rows = []
        for h in range(horizon):
            row = [str(h)]
            for v in variants:
                by = _dig(v['overall'], 'errors', 'by_step', 'mae')
                vals = [x for x in (by[h] if by and h < len(by) else []) if x is not None]
                row.append(_f(float(np.mean(vals))) if vals else '-')
            rows.append(row)
        md += _table(['step'] + labels, rows)
    md += ['### Seam jump (|first new action - previous chunk\'s plan for that tick, or its last action|)', '']
    rows = [[n] + [f'{_f(_dig(v["overall"], "seam_jump", "per_dim", n, "mean"))} / '
                   f'{_f(_dig(v["overall"], "seam_jump", "per_dim", n, "max"))}' for v in variants] for n in names]
    md += _table(['dimension'] + [f'{lab} mean / max' for lab in labels], rows)

    md += ['## Per bag', '']
    for bag in report['bags']:
        md += [f'### `{bag["path"]}`', '']
        md += _overall_table(variants, labels, lambda v, p=bag['path']: v['per_bag'][p])

    md += ['## Speed', '']
    rows = [[v['label'], _f(v['speed']['recorded_s']), _f(v['speed']['replay_wall_s']),
             _f(v['speed']['realtime_factor'], 3) + 'x'] for v in variants]
    md += _table(['variant', 'recorded s', 'replay wall s', 'speed'], rows)
    sp = report['speed']
    md += [f'Whole run including bag reading ({_f(sp["read_s"])} s, overlapped with prediction): '
           f'{_f(sp["total_wall_s"])} s, {_f(sp["realtime_factor"], 3)}x real time.', '']
    if report.get('plots'):
        md += ['## Plots', '']
        md += [f'![{Path(p).stem}]({p})' for p in report['plots']] + ['']
    md += ['## Policies', '']
    for v in variants:
        md += [f'- **{v["label"]}**: `{json.dumps(v["policy"], default=str)}`']
    return '\n'.join(md) + '\n'


def _overall_table(variants, labels, pick) -> list[str]:
    def row(title, get):
        return [title] + [get(pick(v)) for v in variants]

    def err(kind, part):
        return lambda o: (f'{_f(_dig(o, kind, part, "mae"))} / {_f(_dig(o, kind, part, "mse"))}'
                          if o[kind] else o['error_note'] or '-')

    rows = [
        row('episodes / ticks / chunks', lambda o: f'{o["episodes"]} / {o["ticks"]} / {o["chunks"]}'),
        row('arm MAE / MSE (all steps)', err('errors', 'arm')),
        row('gripper MAE / MSE (all steps)', lambda o: err('errors', 'gripper')(o) if _dig(o, 'errors', 'gripper')
            or not o['errors'] else '-'),
        row('arm MAE / MSE (executed)', err('executed_errors', 'arm')),
        row('latency ms p50 / p90 / p99',
            lambda o: ' / '.join(_f(_dig(o, 'latency_ms', 'total', k), 3) for k in ('p50', 'p90', 'p99'))),
        row('NFE mean (min-max)', lambda o: f'{_f(_dig(o, "nfe", "mean"), 3)} ({_f(_dig(o, "nfe", "min"))}-'
                                            f'{_f(_dig(o, "nfe", "max"))})'),
    ]
    return _table(['figure'] + labels, rows)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """report.json + report.md in ``out_dir`` (each written atomically)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / 'report.json', out_dir / 'report.md'
    write_json(report, json_path)
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path
