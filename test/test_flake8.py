"""Code style, the ros2/demos way: ament_flake8 with this project's settings (setup.cfg [flake8]).

`colcon test` runs it on a ROS 2 install; `make setup` installs ament_flake8 and flake8 from PyPI, so CI runs it too.
Skipped where ament_flake8 is not importable.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    main = pytest.importorskip('ament_flake8.main', reason='ament_flake8 is not installed')
    paths = [str(REPO / p) for p in ('blockvla_ros', 'test', 'launch', 'benchmarks', 'setup.py')]
    rc, errors = main.main_with_errors(argv=['--config', str(REPO / 'setup.cfg'), *paths])
    assert rc == 0, f'{len(errors)} code style errors (setup.cfg [flake8]):\n' + '\n'.join(errors)
