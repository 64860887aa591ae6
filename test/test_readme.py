"""README's reference tables against the code they describe, so a renamed or added parameter cannot go stale there."""
import re
from pathlib import Path

import yaml

from blockvla_ros.ros import params as P

README = Path(__file__).resolve().parents[1] / 'README.md'


def _parameter_rows() -> dict:
    """README's policy-node parameter table: name -> (default text, description)."""
    lines = README.read_text().splitlines()
    start = lines.index('| parameter | default | |') + 2  # the header and its --- row
    rows = {}
    for line in lines[start:]:
        if not line.startswith('|'):
            break
        m = re.match(r'\| `([^`]+)` \| `([^`]*)` \|\s*(.*?)\s*\|$', line)
        assert m, f'README parameter row not as `name` | `default` | text: {line!r}'
        assert m.group(1) not in rows, f'{m.group(1)} listed twice'
        rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_readme_lists_every_node_parameter_with_its_default_and_liveness():
    rows = _parameter_rows()
    declared = [s.name for s in P.SPECS]
    assert sorted(rows) == sorted(declared), (f'missing from README: {sorted(set(declared) - set(rows))}; '
                                              f'not declared: {sorted(set(rows) - set(declared))}')
    for spec in P.SPECS:
        text, description = rows[spec.name]
        value = yaml.safe_load(text)
        assert value == spec.default and type(value) is type(spec.default), \
            f'{spec.name}: README says {text}, the node declares {spec.default!r}'
        assert description.startswith('live:') == spec.live, f'{spec.name}: live is {spec.live}'
