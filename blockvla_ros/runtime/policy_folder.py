"""The policy folder: what `blockvla-export` writes and every engine loads (no torch, nothing unpickled).

    models/<name>/                     format 2: each weight stored once
      policy.yaml        format_version, name, config (BlockVLAConfig), kv_shape, prefix (the layout), actions
                         (names, low, high), graphs (file, sidecar, I/O names/shapes/dtypes; 'n' = token count),
                         tables, precision, calibration (the default decoding chosen on held-out windows)
      stats.json         normalization statistics
      vision.onnx        vision tower + projector (static shapes; + vision.onnx.data above 16 MiB of weights)
      backbone.onnx      the decoder layers + final norm + action head, one graph for every pass (dynamic n)
      backbone.onnx.data its weights, when they pass 16 MiB (one external-data file)
      tables.safetensors text / action embeddings, state projection (read by numpy; the text table row by row
                         from disk), the text table quantized at int8 / int4 (runtime.tables: layouts, checks)
      model.safetensors  (optional) the torch weights for engine 'torch' (a second copy of every weight)
      tokenizer files    (optional)
      manifest.json      sha256 of every other file; verified on load

The closed world: every regular file in the folder is listed in manifest.json with its sha256, and nothing else is
there (no symlinks, files or subfolders alike, no unlisted files: each is refused by name); readers get their paths
from `PolicySpec.listed` / `PolicySpec.tokenizer_paths`, never by globbing the folder. Every field of policy.yaml,
stats.json and manifest.json is typed and ranged by policy_schema.py; `config.backbone_path` must be null (weights
come from the folder only). Whatever is wrong raises `PolicyFolderError` naming the file and the field.
`resolve_policy` maps a node's `policy` parameter to a folder inside the configured policy directories and refuses
anything else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from . import policy_schema as schema
from ..model.action_tokenizer import NormStats
from ..model.config import BlockVLAConfig
from .policy_schema import PolicyFolderError  # noqa: F401  (re-exported: callers import it from here)
from .tables import Tables, TablesError

log = logging.getLogger(__name__)
SAFE_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)  # libyaml's parser when built in (4x faster), the same
#                                                             safe constructors

FORMAT_VERSION = 2
POLICY_FILE = 'policy.yaml'
STATS_FILE = 'stats.json'
MANIFEST_FILE = 'manifest.json'
WEIGHTS_FILE = 'model.safetensors'
TABLES_FILE = 'tables.safetensors'


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints, or strings for dims that vary with the token count / cache slots read ('n', 'n + past')
    dtype: str  # numpy dtype name: float32 | float16 | int64 | bool

    def to_dict(self) -> dict:
        return {'name': self.name, 'shape': [d if isinstance(d, str) else int(d) for d in self.shape],
                'dtype': self.dtype}

    def concrete(self, n: int, past: int | None = None, m: int | None = None) -> tuple:
        """The shape for token count n, `past` cache slots read and m logit rows (default n; a symbolic dim is a sum
        of a*n, past, m and an integer: checked by policy_schema)."""
        return tuple(d if isinstance(d, int) else schema.dim_value(d, n, past, m) for d in self.shape)

    @property
    def symbols(self) -> set:
        """The symbols its dims use ('n', 'past', 'm')."""
        return {s for d in self.shape if isinstance(d, str) for s in schema.dim_symbols(d)}


@dataclass
class GraphSpec:
    key: str  # vision | backbone
    file: str
    inputs: list  # [TensorSpec]
    outputs: list  # [TensorSpec]
    data: list = field(default_factory=list)  # the external-data file, if any

    def to_dict(self) -> dict:
        return {'file': self.file, 'data': list(self.data), 'inputs': [t.to_dict() for t in self.inputs],
                'outputs': [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, key: str, d: dict) -> 'GraphSpec':
        """One graph entry of policy.yaml, validated by policy_schema.graph (PolicyFolderError when malformed)."""
        return cls.from_checked(key, schema.graph(key, d, POLICY_FILE))

    @classmethod
    def from_checked(cls, key: str, g: dict) -> 'GraphSpec':
        """From what policy_schema.graph returned."""
        return cls(key=key, file=g['file'], data=g['data'], inputs=[TensorSpec(*t) for t in g['inputs']],
                   outputs=[TensorSpec(*t) for t in g['outputs']])

    def files(self) -> list:
        return [self.file, *self.data]

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs + self.outputs if t.name == name)


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
    tables: str = TABLES_FILE  # the small tables (runtime.tables)
    precision: str = 'fp32'  # weights of the graphs: fp32 | fp16 | int8 | int4 (weight-only)
    weights: Optional[str] = None  # model.safetensors for the torch engine, if exported
    tokenizer_files: list = field(default_factory=list)
    calibration: Optional[dict] = None  # the decoding calibration export measured (policy_schema.calibration)

    @property
    def float_dtype(self) -> str:
        """The float type of the backbone's embeds / cache inputs (float32, or float16 for fp16 exports)."""
        return self.graphs['backbone'].tensor('embeds').dtype

    def path(self, key: str) -> Path:
        return self.listed(self.graphs[key].file)

    def listed(self, name: str) -> Path:
        """The path of a file the verified manifest lists; anything else is a PolicyFolderError.

        The one way for a reader to get a path inside the folder: it can only open what the manifest vouches for."""
        if name not in self.manifest:
            raise PolicyFolderError(f'{self.folder / name}: not listed in {MANIFEST_FILE}')
        return self.folder / name

    @property
    def tokenizer_paths(self) -> dict:
        """{file name: path} of the tokenizer files policy.yaml names (each listed in the manifest, verified)."""
        return {name: self.listed(name) for name in self.tokenizer_files}

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
    return schema.file_name(name, where)


def folder_entries(folder: str | os.PathLike) -> dict:
    """{relative path: 'file' | 'dir' | 'symlink' | 'other'} of everything under `folder`, symlinks not followed."""
    folder = Path(folder)
    out = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            st = os.lstat(p)
            out[rel] = ('symlink' if stat.S_ISLNK(st.st_mode) else 'dir' if stat.S_ISDIR(st.st_mode)
                        else 'file' if stat.S_ISREG(st.st_mode) else 'other')
    return out


def build_manifest(folder: str | os.PathLike) -> dict:
    """{'format_version', 'algorithm', 'files': {relative path: sha256}} over every file except the manifest.

    Symlinks and special files are refused: a policy folder holds regular files only."""
    folder = Path(folder)
    entries = folder_entries(folder)
    odd = sorted(rel for rel, kind in entries.items() if kind in ('symlink', 'other'))
    if odd:
        raise PolicyFolderError(f'{folder}: symlinks or special files {odd}: a policy folder holds regular files only')
    files = {rel: sha256_file(folder / rel) for rel, kind in sorted(entries.items())
             if kind == 'file' and rel != MANIFEST_FILE}
    return {'format_version': FORMAT_VERSION, 'algorithm': 'sha256', 'files': files}


def write_manifest(folder: str | os.PathLike) -> dict:
    from ..io.atomic import atomic_write_text

    manifest = build_manifest(folder)
    atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _read_text(path: Path, limit: int = schema.MAX_DESCRIPTION_BYTES, what: str = 'a description file') -> str:
    """A description file (policy.yaml, stats.json, manifest.json) of bounded size, as UTF-8 text."""
    size = path.stat().st_size
    if size > limit:
        raise PolicyFolderError(f'{path}: {size} bytes; {what} is at most {limit}')
    try:
        return path.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise PolicyFolderError(f'{path}: not UTF-8 text ({e})') from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise PolicyFolderError(f'{path}: not valid JSON ({e})') from None


def verify_manifest(folder: str | os.PathLike) -> dict:
    """The closed world: check every listed file's sha256 -> {file: sha256}.

    Refused, naming the path: a missing or changed listed file; any symlink (file or subfolder, wherever it points)
    or special file in the folder; any regular file the manifest does not list (a reader such as a tokenizer could
    otherwise pick it up). So every file a reader opens inside the folder is one the manifest vouches for.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    entries = folder_entries(folder)
    if entries.get(MANIFEST_FILE) != 'file':
        if MANIFEST_FILE in entries:
            raise PolicyFolderError(f'{mpath}: not a regular file ({entries[MANIFEST_FILE]})')
        raise PolicyFolderError(f'{folder}: {MANIFEST_FILE} is missing; export the policy with blockvla-export')
    files = schema.manifest_files(_read_json(mpath), str(mpath))
    odd = sorted(f'{rel} ({kind})' for rel, kind in entries.items() if kind in ('symlink', 'other'))
    if odd:
        raise PolicyFolderError(f'{folder}: {", ".join(odd)}: a policy folder holds regular files only (a symlink '
                                'could point outside it); copy the files in and re-export')
    for name, digest in sorted(files.items()):
        path = folder / name
        if entries.get(name) != 'file':
            raise PolicyFolderError(f'{path}: listed in {MANIFEST_FILE} but missing')
        actual = sha256_file(path)
        if actual != digest:
            raise PolicyFolderError(f'{path}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...): '
                                    'the file changed after export; re-export the policy')
    extra = sorted(rel for rel, kind in entries.items() if kind == 'file' and rel != MANIFEST_FILE
                   and rel not in files)
    if extra:
        raise PolicyFolderError(f'{folder}: files not listed in {MANIFEST_FILE}: {extra}; a policy folder holds only '
                                'what its manifest lists (remove them, or re-export the policy)')
    return dict(files)


# --- loading ---------------------------------------------------------------------------------------------------
def load_policy_folder(folder: str | os.PathLike) -> PolicySpec:
    """Verify the manifest (closed world), then read and validate policy.yaml + stats.json. Nothing is unpickled.

    Every way a folder can be wrong raises PolicyFolderError naming the file and field (see policy_schema.py).
    """
    folder = Path(os.path.realpath(folder))
    if not folder.is_dir():
        raise PolicyFolderError(f'policy folder not found: {folder}')
    manifest = verify_manifest(folder)

    def covered(name: str, what: str) -> str:
        _check_name(name, f'{folder / POLICY_FILE} ({what})')
        if name not in manifest:
            raise PolicyFolderError(f'{folder / name}: {what} is not covered by {MANIFEST_FILE}')
        return name

    where = str(folder / POLICY_FILE)
    covered(POLICY_FILE, 'policy description')
    try:
        raw = yaml.load(_read_text(folder / POLICY_FILE, schema.MAX_POLICY_BYTES, POLICY_FILE), Loader=SAFE_LOADER)
    except (yaml.YAMLError, RecursionError) as e:
        raise PolicyFolderError(f'{where}: cannot parse ({e})') from None
    if not isinstance(raw, dict):
        raise PolicyFolderError(f'{where}: expected a mapping')
    schema.document_size(raw, where)  # before anything copies it (config.replace deep-copies sections)
    version = raw.get('format_version')
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise PolicyFolderError(f'{where}: format_version {version!r} is not supported (this runtime reads '
                                f'{FORMAT_VERSION}, which stores each weight once in one backbone graph); re-export '
                                'the policy with blockvla-export')
    schema.policy_document(raw, where)
    name = schema.string(raw['name'], f'{where}: name', max_len=schema.MAX_NAME_LEN)
    config = schema.config(raw['config'], where)
    kv_shape = schema.kv_shape(raw['kv_shape'], where)
    names, low, high = schema.actions(raw['actions'], where, config.action_dim)
    graphs = {k: GraphSpec.from_checked(k, v) for k, v in schema.graphs(raw['graphs'], where, config).items()}
    if 'image_size' in raw and schema.integer(raw['image_size'], f'{where}: image_size', 1) != config.image_size:
        raise PolicyFolderError(f'{where}: image_size {raw["image_size"]} differs from config.image_size '
                                f'{config.image_size}')
    if 'prefix' in raw:
        schema.prefix(raw['prefix'], where, config)
    calibration = schema.calibration(raw['calibration'], where, config) if 'calibration' in raw else None
    if 'export' in raw:
        schema.export_info(raw['export'], where)
    covered(STATS_FILE, 'normalization statistics')
    stats = schema.stats(_read_json(folder / STATS_FILE), str(folder / STATS_FILE), config.action_dim,
                         config.state_dim)
    for g in graphs.values():
        for f in g.files():
            covered(f, f'graph {g.key!r}')
    tables = covered(schema.string(raw['tables'], f'{where}: tables', (TABLES_FILE,)), 'tables')
    embeds = next((t for t in graphs['backbone'].inputs if t.name == 'embeds'), None)
    if embeds is None:
        raise PolicyFolderError(f'{where}: graphs.backbone has no input named embeds (the runtime feeds it)')
    check_tables(folder / tables, config, embeds.shape[-1])
    precision = schema.precision(raw.get('precision', 'fp32'), where)
    weights = schema.weights(raw.get('weights'), where, WEIGHTS_FILE)
    if weights:
        covered(weights, 'torch weights')
    reserved = {POLICY_FILE, STATS_FILE, MANIFEST_FILE, WEIGHTS_FILE, TABLES_FILE,
                *(f for g in graphs.values() for f in g.files())}
    tokenizer_files = [covered(f, 'tokenizer file') for f in
                       schema.tokenizer_files(raw.get('tokenizer_files', []), where, config.text_tokenizer, reserved)]
    return PolicySpec(folder=folder, name=name, config=config, stats=stats, kv_shape=kv_shape, graphs=graphs,
                      action_names=names, action_low=np.asarray(low, dtype=np.float32),
                      action_high=np.asarray(high, dtype=np.float32), manifest=manifest, raw=raw, tables=tables,
                      precision=precision, weights=weights, tokenizer_files=tokenizer_files, calibration=calibration)


def check_tables(path: Path, config: BlockVLAConfig, hidden: int) -> None:
    """tables.safetensors reads (header and the small tables; the text table stays on disk), its text table has one
    of the layouts of runtime.tables, and its sizes fit the config and the backbone's embeds width."""
    try:
        Tables.open(path).check(config.n_bins, config.state_dim, hidden, str(path))
    except (TablesError, OSError) as e:
        raise PolicyFolderError(f'{path}: {e}') from e


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
