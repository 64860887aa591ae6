"""The evaluation report: report.json (everything but pixels), report.md (the per-task table) and montage.png
(one rollout per task: frames of its first episode, left to right, labelled with the outcome)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from blockvla_ros.io.atomic import atomic_write_bytes, atomic_write_text


def markdown_table(result: dict) -> str:
    expert = result.get('expert') or {}
    lines = [f"Closed-loop success on Meta-World {result.get('suite', 'mt10').upper()}, layout seed "
             f"{result['seed']}, {result['episodes_per_task']} episodes per task, policy `{result.get('policy')}` "
             f"({_path(result)})", '',
             '| task | policy | expert | mean steps |', '| --- | ---: | ---: | ---: |']
    for name, r in result['per_task'].items():
        e = f'{100 * expert[name]:.0f} %' if name in expert else '-'
        lines.append(f"| {name} | {100 * r['success_rate']:.0f} % ({r['successes']}/{r['episodes']}) | {e} | "
                     f"{r['mean_steps']:.0f} |")
    avg_e = f"{100 * result['expert_success_rate']:.1f} %" if 'expert_success_rate' in result else '-'
    lines.append(f"| **average** | **{100 * result['success_rate']:.1f} %** | {avg_e} | |")
    return '\n'.join(lines) + '\n'


def _path(result: dict) -> str:
    if result.get('path') != 'ros':
        return f"PolicyRunner, replanning every {result.get('execute_steps')} actions"
    params = ''.join(f', {k}={v}' for k, v in (result.get('node_params') or {}).items())
    return f"sim bridge + policy node over ROS 2, real-time factor {result.get('real_time_factor')}{params}"


def montage(frames: dict, per_task: dict, scale: int = 2) -> np.ndarray:
    """[rows * S*scale + labels, cols * S*scale, 3] uint8 RGB: one row per task."""
    rows = []
    width = max(len(f) for f in frames.values())
    for name, imgs in frames.items():
        size = imgs[0].shape[0] * scale
        tiles = [cv2.resize(im, (size, size), interpolation=cv2.INTER_NEAREST) for im in imgs]
        tiles += [np.zeros_like(tiles[0])] * (width - len(tiles))
        label = np.full((14, size * width, 3), 255, np.uint8)
        ok = per_task.get(name, {}).get('episodes_detail', [{}])[0].get('success')
        text = f'{name}: episode 0 {"success" if ok else "failure"}'
        cv2.putText(label, text, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [label, np.concatenate(tiles, axis=1)]
    return np.concatenate(rows, axis=0)


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frames = result.pop('frames', {}) or {}
    atomic_write_text(out / 'report.json', json.dumps(result, indent=2) + '\n')
    atomic_write_text(out / 'report.md', markdown_table(result))
    if frames:
        ok, buf = cv2.imencode('.png', cv2.cvtColor(montage(frames, result['per_task']), cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(out / 'montage.png', buf.tobytes())
