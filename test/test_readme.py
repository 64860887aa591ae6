"""README's reference tables against the code they describe, so a renamed or added parameter cannot go stale there."""
import os
import re
import subprocess
import sys
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


ROOT = README.parent
DOCS = [README, *sorted((ROOT / 'docs' / 'benchmarks').glob('*.md'))]
# A command as the docs show it: a console script (with its subcommand) or a benchmark script.
COMMAND = re.compile(r'(?<![\w/-])(benchmarks/[a-z_]+\.py|blockvla-[a-z]+(?:-[a-z]+)*|bag_record|bag_play|sim_bridge)'
                     r'(?: ([a-z]+(?:-[a-z]+)*))?')
FLAG = re.compile(r'(?<![\w-])(--[a-z0-9][a-z0-9-]*)')


def _console_scripts() -> dict:
    """setup.py's console scripts: name -> 'module:function'."""
    text = (ROOT / 'setup.py').read_text()
    return dict(re.findall(r"'([\w-]+) = ([\w.]+:\w+)'", text))


def _help(script: str, subcommand: str = '') -> subprocess.CompletedProcess:
    """`SCRIPT [SUBCOMMAND] --help` as a user runs it (a console script under its own name, or a benchmark file)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    args = [subcommand, '--help'] if subcommand else ['--help']
    if script.startswith('benchmarks/'):
        cmd = [sys.executable, str(ROOT / script), *args]
    else:
        module, function = _console_scripts()[script].split(':')
        cmd = [sys.executable, '-c', f'import sys; sys.argv[0] = {script!r}; from {module} import {function}; '
               f'sys.exit({function}())', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def _shown_commands() -> list:
    """(doc, command, subcommand word or '', flags) for every command in a code block or code span of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        pieces = []
        for i, part in enumerate(re.split(r'^```.*$', text, flags=re.M)):
            if i % 2:  # a fenced block: one command per line (backslash continuations joined), comments cut
                for line in re.sub(r'\\\n\s*', ' ', part).splitlines():
                    pieces.append(re.split(r'\s#\s', line)[0])
            else:  # prose: its code spans (which wrap across lines)
                pieces += [span.replace('\n', ' ') for span in re.findall(r'`([^`]+)`', part)]
        for piece in pieces:
            matches = list(COMMAND.finditer(piece))
            for k, m in enumerate(matches):
                end = matches[k + 1].start() if k + 1 < len(matches) else len(piece)
                found.append((doc.name, m.group(1), m.group(2) or '', FLAG.findall(piece[m.end(1):end])))
    return found


def test_every_console_script_answers_help_under_its_own_name():
    """`NAME --help` works for every console script (policy_node aside: a ROS node takes --ros-args), and its usage
    line names a command that exists (blockvla-bag-play and bag_play are one entry point)."""
    scripts = _console_scripts()
    for name, target in scripts.items():
        if name == 'policy_node':
            continue
        result = _help(name)
        assert result.returncode == 0, f'{name} --help: {result.stderr[-2000:]}'
        usage = re.match(r'usage: (\S+)', result.stdout)
        assert usage and scripts.get(usage.group(1)) == target, f'{name} --help says {result.stdout[:80]!r}'


def test_every_flag_the_docs_show_is_accepted_by_its_command():
    """Each `--flag` after a command in README's or a benchmark page's code is in that command's --help."""
    shown = _shown_commands()
    assert len(shown) > 50 and any(flags for *_, flags in shown)  # the parser still finds the docs' commands
    scripts = _console_scripts()
    helps, wrong = {}, []
    for doc, script, word, flags in shown:
        if script not in scripts and not script.startswith('benchmarks/'):
            wrong.append(f'{doc}: {script} is neither a console script nor a benchmark')
            continue
        if not flags or script == 'policy_node':
            continue
        if script not in helps:
            top = _help(script)
            assert top.returncode == 0, f'{script} --help: {top.stderr[-2000:]}'
            helps[script] = top.stdout
        subcommands = re.search(r'\{([\w,-]+)\}', helps[script])
        if word and subcommands and word in subcommands.group(1).split(','):
            if (script, word) not in helps:
                helps[script, word] = _help(script, word).stdout
            text = helps[script, word]
        else:
            text = helps[script]
        wrong += [f'{doc}: {script} {word} {flag}'.replace('  ', ' ') for flag in flags
                  if not re.search(re.escape(flag) + r'(?![\w-])', text)]
    assert not wrong, 'flags the docs show that the command\'s --help does not list:\n' + '\n'.join(sorted(set(wrong)))
