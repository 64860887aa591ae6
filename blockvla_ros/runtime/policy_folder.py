"""The policy folder: what `blockvla-export` writes and every engine loads (no torch, nothing unpickled).

    models/<name>/
      policy.yaml      format_version, name, config (BlockVLAConfig), kv_shape, actions (names, low, high),
                       graphs (file, sidecars, I/O names/shapes/dtypes; step graphs carry their width n)
      stats.json       normalization statistics
      *.onnx (+ *.onnx.data sidecars)
      model.safetensors + tokenizer files (optional)
      manifest.json    sha256 of every other file; verified on load

A folder whose manifest does not match, that misses a file, or that names a file outside itself raises
`PolicyFolderError` naming the file. `resolve_policy` maps a node's `policy` parameter to a folder inside the
configured policy directories and refuses anything else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from ..model.action_tokenizer import NormStats
from ..model.config import BlockVLAConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
POLICY_FILE = 'policy.yaml'
STATS_FILE = 'stats.json'
MANIFEST_FILE = 'manifest.json'
WEIGHTS_FILE = 'model.safetensors'


class PolicyFolderError(ValueError):
    """A policy folder is missing, incomplete, changed after export, or outside the allowed directories."""


@dataclass
class TensorSpec:
    name: str
    shape: list  # fully static
    dtype: str  # numpy dtype name: float32 | int64 | bool

    def to_dict(self) -> dict:
        return {'name': self.name, 'shape': [int(d) for d in self.shape], 'dtype': self.dtype}


@dataclass
class GraphSpec:
    key: str  # vision | prefill | text_prefill | obs_prefill | step_<n>
    file: str
    inputs: list  # [TensorSpec]
    outputs: list  # [TensorSpec]
    data: list = field(default_factory=list)  # external-data sidecar files
    step_width: Optional[int] = None  # n for step graphs

    def to_dict(self) -> dict:
        out = {'file': self.file, 'data': list(self.data), 'inputs': [t.to_dict() for t in self.inputs],
               'outputs': [t.to_dict() for t in self.outputs]}
        if self.step_width is not None:
            out['step_width'] = int(self.step_width)
        return out

    @classmethod
    def from_dict(cls, key: str, d: dict) -> 'GraphSpec':
        try:
            return cls(key=key, file=str(d['file']), data=[str(x) for x in d.get('data', [])],
                       inputs=[TensorSpec(str(t['name']), list(t['shape']), str(t['dtype'])) for t in d['inputs']],
                       outputs=[TensorSpec(str(t['name']), list(t['shape']), str(t['dtype'])) for t in d['outputs']],
                       step_width=d.get('step_width'))
        except (KeyError, TypeError) as e:
            raise PolicyFolderError(f'{POLICY_FILE}: graph {key!r} is malformed ({e!r})') from e

    def files(self) -> list:
        return [self.file, *self.data]


@dataclass
class PolicySpec:
    """A verified policy folder, read back (pure numpy / yaml)."""

    folder: Path
    name: str
    config: BlockVLAConfig
    stats: NormStats
    kv_shape: tuple  # (layers, kv_heads, head_dim)
    graphs: dict  # key -> GraphSpec
    action_names: list
    action_low: np.ndarray
    action_high: np.ndarray
    manifest: dict  # file -> sha256
    raw: dict  # policy.yaml as loaded
    weights: Optional[str] = None  # model.safetensors for the torch engine, if exported
    tokenizer_files: list = field(default_factory=list)

    @property
    def split_prefill(self) -> bool:
        """True when text_prefill + obs_prefill exist (instruction KV reusable across calls)."""
        return 'text_prefill' in self.graphs and 'obs_prefill' in self.graphs

    def step_key(self, n: int) -> str:
        key = f'step_{int(n)}'
        if key not in self.graphs:
            widths = sorted(g.step_width for g in self.graphs.values() if g.step_width)
            raise PolicyFolderError(f'{self.folder}: no step graph of width {n} (exported widths: {widths})')
        return key

    def path(self, key: str) -> Path:
        return self.folder / self.graphs[key].file

    def graph_sha256(self, key: str) -> str:
        """One hash over a graph file and its sidecars (from the verified manifest)."""
        h = hashlib.sha256()
        for f in self.graphs[key].files():
            h.update(f.encode() + b'\0' + self.manifest[f].encode() + b'\0')
        return h.hexdigest()


# --- hashing / manifest ----------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _check_name(name: str, where: str) -> str:
    """A file name inside the folder: relative, no '..', no absolute path (nothing outside the folder)."""
    p = Path(name)
    if not name or p.is_absolute() or '..' in p.parts or name.startswith('~'):
        raise PolicyFolderError(f'{where}: file name {name!r} points outside the policy folder')
    return name


def build_manifest(folder: str | os.PathLike) -> dict:
    """{'format_version', 'algorithm', 'files': {relative path: sha256}} over every file except the manifest."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob('*')):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST_FILE:
            files[rel] = sha256_file(p)
    return {'format_version': FORMAT_VERSION, 'algorithm': 'sha256', 'files': files}


def write_manifest(folder: str | os.PathLike) -> dict:
    from ..io.atomic import atomic_write_text

    manifest = build_manifest(folder)
    atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(folder: str | os.PathLike) -> dict:
    """Check every listed file's sha256; -> {file: sha256}. Missing/changed files raise PolicyFolderError."""
    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        raise PolicyFolderError(f'{folder}: {MANIFEST_FILE} is missing; export the policy with blockvla-export')
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest['files']
        if manifest.get('algorithm', 'sha256') != 'sha256' or not isinstance(files, dict):
            raise ValueError('unsupported layout')
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PolicyFolderError(f'{mpath}: not a valid manifest ({e})') from e
    for name, digest in sorted(files.items()):
        _check_name(name, str(mpath))
        path = folder / name
        if not path.is_file():
            raise PolicyFolderError(f'{path}: listed in {MANIFEST_FILE} but missing')
        actual = sha256_file(path)
        if actual != digest:
            raise PolicyFolderError(f'{path}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...): '
                                    'the file changed after export; re-export the policy')
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*')
                   if p.is_file() and p.name != MANIFEST_FILE and p.relative_to(folder).as_posix() not in files)
    if extra:
        log.warning('%s: files not covered by the manifest are ignored: %s', folder, extra)
    return dict(files)


# --- loading ---------------------------------------------------------------------------------------------------
def load_policy_folder(folder: str | os.PathLike) -> PolicySpec:
    """Verify the manifest, then read policy.yaml + stats.json. Nothing is unpickled."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PolicyFolderError(f'policy folder not found: {folder}')
    manifest = verify_manifest(folder)

    def covered(name: str, what: str) -> str:
        _check_name(name, f'{folder / POLICY_FILE} ({what})')
        if name not in manifest:
            raise PolicyFolderError(f'{folder / name}: {what} is not covered by {MANIFEST_FILE}')
        return name

    covered(POLICY_FILE, 'policy description')
    try:
        raw = yaml.safe_load((folder / POLICY_FILE).read_text())
    except yaml.YAMLError as e:
        raise PolicyFolderError(f'{folder / POLICY_FILE}: cannot parse ({e})') from e
    if not isinstance(raw, dict):
        raise PolicyFolderError(f'{folder / POLICY_FILE}: expected a mapping')
    version = raw.get('format_version')
    if version != FORMAT_VERSION:
        raise PolicyFolderError(f'{folder / POLICY_FILE}: format_version {version!r} is not supported '
                                f'(this runtime reads {FORMAT_VERSION}); re-export the policy')
    try:
        config = BlockVLAConfig.from_dict(raw['config'])
        kv_shape = tuple(int(x) for x in raw['kv_shape'])
        actions = raw['actions']
        graphs = {k: GraphSpec.from_dict(k, v) for k, v in raw['graphs'].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyFolderError(f'{folder / POLICY_FILE}: incomplete or invalid ({e!r})') from e
    covered(STATS_FILE, 'normalization statistics')
    stats = NormStats.load(folder / STATS_FILE)
    if len(stats.action_low) != config.action_dim:
        raise PolicyFolderError(f'{folder / STATS_FILE}: {len(stats.action_low)} action dims, config has '
                                f'{config.action_dim}')
    for key in ('vision', 'prefill'):
        if key not in graphs:
            raise PolicyFolderError(f'{folder / POLICY_FILE}: graph {key!r} is not listed')
    for g in graphs.values():
        for f in g.files():
            covered(f, f'graph {g.key!r}')
    weights = raw.get('weights')
    if weights:
        covered(weights, 'torch weights')
    tokenizer_files = [covered(f, 'tokenizer file') for f in raw.get('tokenizer_files', [])]
    low = np.asarray(actions['low'], dtype=np.float32)
    high = np.asarray(actions['high'], dtype=np.float32)
    names = list(actions['names'])
    if not (len(names) == low.shape[0] == high.shape[0] == config.action_dim):
        raise PolicyFolderError(f'{folder / POLICY_FILE}: actions.names/low/high must have {config.action_dim} '
                                'entries each')
    return PolicySpec(folder=folder, name=str(raw.get('name', folder.name)), config=config, stats=stats,
                      kv_shape=kv_shape, graphs=graphs, action_names=names, action_low=low, action_high=high,
                      manifest=manifest, raw=raw, weights=weights, tokenizer_files=tokenizer_files)


def resolve_policy(name_or_path: str | os.PathLike, policy_dirs: Sequence[str | os.PathLike]) -> Path:
    """A policy name or relative path (under one of `policy_dirs`, first match) or an absolute path inside them.

    Anything whose real path (symlinks resolved) is not inside a configured directory is refused.
    """
    text = str(name_or_path).strip()
    if not text:
        raise PolicyFolderError('policy name is empty')
    roots = [Path(os.path.realpath(os.path.expanduser(str(d)))) for d in policy_dirs]
    if not roots:
        raise PolicyFolderError('no policy directories are configured')
    given = Path(os.path.expanduser(text))
    candidates = [given] if given.is_absolute() else [r / given for r in roots]  # relative: under a root
    for cand in candidates:
        real = Path(os.path.realpath(cand))
        inside = any(real == r or r in real.parents for r in roots)
        if not inside:
            raise PolicyFolderError(f'policy {text!r} resolves to {real}, outside the policy directories '
                                    f'{[str(r) for r in roots]}')
        if real in roots:
            raise PolicyFolderError(f'policy {text!r} names a policy directory itself, not a policy folder')
        if (real / POLICY_FILE).is_file():
            return real
    raise PolicyFolderError(f'policy {text!r} not found (no {POLICY_FILE}) in {[str(r) for r in roots]}')
