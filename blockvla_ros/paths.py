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


def pretrained_folder(path, key: str) -> Path:
    """`path` checked as a local HF model folder in the save_pretrained layout (config.json beside the weights);
    errors name `key` (the config key) and, for the hub cache's repo folder (models--org--name, with snapshots/),
    the snapshot folder to give instead."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'{key} is not a folder: {path}')
    if (path / 'config.json').is_file():
        return path
    snapshots = sorted(str(p) for p in (path / 'snapshots').glob('*') if p.is_dir())
    if snapshots:
        raise FileNotFoundError(f'{key} {path} is a Hugging Face hub cache folder, not a model folder: give one of '
                                f'its snapshots ({", ".join(snapshots)})')
    raise FileNotFoundError(f'{key} {path} has no config.json: it must be a local model folder in the save_pretrained '
                            'layout (config.json, weights, tokenizer files), e.g. a hub download\'s snapshot folder')
