"""Where the package's data folders (models/, data/, config/) are: in the source checkout, or installed.

A checkout (pip install -e, `make setup`) keeps them next to the package; `colcon build` (and a plain pip install)
installs them under ``<prefix>/share/blockvla_ros/`` (setup.py data_files), while the Python package lands in
``<prefix>/lib/pythonX.Y/site-packages/``. ROS-free: the ament index is only asked when it is importable.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

PACKAGE = 'blockvla_ros'
_MODULE_DIR = Path(__file__).resolve().parent


def _candidates(name: str) -> list:
    out = []
    checkout = _MODULE_DIR.parent
    if (checkout / 'package.xml').is_file():  # running from the source tree
        out.append(checkout / name)
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            out.append(Path(get_package_share_directory(PACKAGE)) / name)
        except (PackageNotFoundError, OSError, ValueError):  # not installed, or no AMENT_PREFIX_PATH at all
            pass
    except ImportError:
        pass
    # <prefix>/lib/pythonX.Y/site-packages/blockvla_ros -> <prefix>/share/blockvla_ros
    if len(_MODULE_DIR.parents) > 3:
        out.append(_MODULE_DIR.parents[3] / 'share' / PACKAGE / name)
    out.append(Path(sys.prefix) / 'share' / PACKAGE / name)
    return out


def package_data_dir(name: str) -> Optional[Path]:
    """The first existing ``name`` folder (models, data, config) of this package, or None."""
    for path in _candidates(name):
        if path.is_dir():
            return path
    return None


def searched(name: str) -> list:
    """Every place ``package_data_dir`` looks (for error messages)."""
    return [str(p) for p in _candidates(name)]
