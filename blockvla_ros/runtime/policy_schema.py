"""The policy folder's schema, in one place: every field of policy.yaml, stats.json and manifest.json typed and ranged.

Each section has its own reader (`manifest_files`, `config`, `kv_shape`, `actions`, `graphs`, `stats`, ...) that takes
the parsed YAML/JSON value and returns plain, checked Python values, or raises `PolicyFolderError` naming the file,
the field and what was expected. Nothing in here raises TypeError / KeyError / AttributeError on a hostile value
(a `null`, a list where a mapping belongs, an extra key, 1e308): the loader (policy_folder.py) calls these readers
and builds its dataclasses only from what they return. A new layout of a section (e.g. format v2's graphs) is a new
reader for that section, nothing else.

Numbers: every float must be finite and within +-MAX_ABS_VALUE (1e6: physical action/state units; a stats or limit
value of 1e308 would saturate every action or overflow float32 to inf). Tensor dims are positive ints, or (format 2's
backbone) sums like 'n', '2*n', 'n + 356', 'past', 'n + past', 'm' of the token count n, the cache slots a pass reads
(past) and the rows it returns logits for (m), all in [1, T_max]; at most MAX_TENSOR_ELEMENTS elements at
n = past = m = T_max (the engines allocate their I/O buffers from these shapes).
"""
from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

MAX_ABS_VALUE = 1e6
MAX_DESCRIPTION_BYTES = 16 << 20  # stats.json, manifest.json (JSON, parsed in C): kB in practice
MAX_POLICY_BYTES = 2 << 20  # policy.yaml: ~15 kB, ~0.5 MB with a full calibration table. YAML is slow to parse
#                              (a 14 MB list of small values took 162 s, in a node's parameter callback)
MAX_DOCUMENT_NODES = 1 << 20  # values in a parsed document, YAML aliases expanded (a "billion laughs" is refused)
MAX_TENSOR_ELEMENTS = 1 << 30
MAX_DIMS = 8
MAX_NAME_LEN = 255
TENSOR_DTYPES = ('float32', 'float16', 'int64', 'int32', 'bool')
GRAPHS = ('vision', 'backbone')  # format 2: the vision tower and one backbone graph for every pass
DIM_SYMBOLS = ('n', 'past', 'm')  # the backbone's token count, the cache slots a pass reads, the logit rows
DIM_TERM = re.compile(r'^(?:([1-9][0-9]{0,3})\*)?(n|past|m)$|^([0-9]{1,9})$')  # 2*n, past, 356: one term of a dim
PRECISIONS = ('fp32', 'fp16', 'int8', 'int4')
SHA256 = re.compile(r'^[0-9a-f]{64}$')

# policy.yaml: top-level keys (required ones first). `export` is provenance, never read by the runtime.
POLICY_REQUIRED = ('format_version', 'name', 'config', 'kv_shape', 'actions', 'graphs', 'tables')
POLICY_OPTIONAL = ('image_size', 'prefix', 'precision', 'weights', 'tokenizer_files', 'calibration', 'export')
ACTIONS_REQUIRED = ('names', 'low', 'high')
ACTIONS_OPTIONAL = ('limits_source',)
GRAPH_REQUIRED = ('file', 'inputs', 'outputs')
GRAPH_OPTIONAL = ('data',)
TENSOR_KEYS = ('name', 'shape', 'dtype')
STATS_REQUIRED = ('action_low', 'action_high')
STATS_OPTIONAL = ('state_low', 'state_high', 'n_samples')
CALIBRATION_REQUIRED = ('level', 'windows', 'source', 'reference', 'chosen', 'candidates')
CALIBRATION_ROW = ('block_size', 'steps_per_block', 'schedule', 'threshold', 'nfe', 'agreement', 'bin_error')
MAX_CALIBRATION_ROWS = 4096
MANIFEST_REQUIRED = ('files',)
MANIFEST_OPTIONAL = ('format_version', 'algorithm')


class PolicyFolderError(ValueError):
    """A policy folder is missing, incomplete, malformed, changed after export, or outside the allowed directories."""


# --- typed primitives ----------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return 'null' if value is None else type(value).__name__


def mapping(value: Any, where: str, required: tuple = (), optional: tuple | None = ()) -> dict:
    """A mapping with string keys: every `required` key present; no key outside required+optional (None: any key)."""
    if not isinstance(value, dict):
        raise PolicyFolderError(f'{where}: expected a mapping, got {_type_name(value)}')
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise PolicyFolderError(f'{where}: keys must be strings, got {bad[:3]!r}')
    missing = [k for k in required if k not in value]
    if missing:
        raise PolicyFolderError(f'{where}: missing {", ".join(missing)}')
    if optional is not None:
        extra = sorted(set(value) - set(required) - set(optional))
        if extra:
            raise PolicyFolderError(f'{where}: unknown keys {extra} (allowed: {sorted([*required, *optional])})')
    return value


def integer(value: Any, where: str, low: int = 0, high: int = 1 << 31) -> int:
    """An int (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyFolderError(f'{where}: expected an integer, got {_type_name(value)} {value!r:.60}')
    if not low <= value <= high:
        raise PolicyFolderError(f'{where}: {value} is outside [{low}, {high}]')
    return value


def number(value: Any, where: str, bound: float = MAX_ABS_VALUE) -> float:
    """A finite int or float with |value| <= bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyFolderError(f'{where}: expected a number, got {_type_name(value)} {value!r:.60}')
    value = float(value)
    if not math.isfinite(value) or abs(value) > bound:
        raise PolicyFolderError(f'{where}: {value!r} is not a finite number within +-{bound:g}')
    return value


def string(value: Any, where: str, choices: tuple | None = None, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise PolicyFolderError(f'{where}: expected a string, got {_type_name(value)} {value!r:.60}')
    if len(value) > max_len:
        raise PolicyFolderError(f'{where}: string of {len(value)} characters (limit {max_len})')
    if choices is not None and value not in choices:
        raise PolicyFolderError(f'{where}: {value!r} is not one of {list(choices)}')
    return value


def listing(value: Any, where: str, length: int | None = None, max_len: int = 1 << 16) -> list:
    if not isinstance(value, list):
        raise PolicyFolderError(f'{where}: expected a list, got {_type_name(value)} {value!r:.60}')
    if length is not None and len(value) != length:
        raise PolicyFolderError(f'{where}: expected {length} entries, got {len(value)}')
    if len(value) > max_len:
        raise PolicyFolderError(f'{where}: {len(value)} entries (limit {max_len})')
    return value


def numbers(value: Any, where: str, length: int | None = None) -> list:
    return [number(x, f'{where}[{i}]') for i, x in enumerate(listing(value, where, length))]


def strings(value: Any, where: str, length: int | None = None, unique: bool = True, max_len: int = 1 << 16) -> list:
    out = [string(x, f'{where}[{i}]', max_len=MAX_NAME_LEN)
           for i, x in enumerate(listing(value, where, length, max_len))]
    if unique and len(set(out)) != len(out):
        raise PolicyFolderError(f'{where}: duplicate entries in {out}')
    return out


def file_name(value: Any, where: str) -> str:
    """A relative POSIX path inside the folder: no absolute path, no '..', no '~', no empty or '.' parts."""
    name = string(value, where, max_len=1024)
    parts = PurePosixPath(name).parts
    if (not name or name.startswith(('/', '~')) or '\\' in name or '\0' in name or not parts
            or any(p in ('', '.', '..') for p in name.split('/'))):
        raise PolicyFolderError(f'{where}: file name {name!r} points outside the policy folder')
    return name


def bounds_pair(low: list, high: list, where: str) -> None:
    bad = [i for i, (lo, hi) in enumerate(zip(low, high)) if hi < lo]
    if bad:
        raise PolicyFolderError(f'{where}: high < low in dimensions {bad}')


def document_size(doc: Any, where: str, limit: int = MAX_DOCUMENT_NODES) -> int:
    """The number of values in `doc` as a deep copy would hold them (YAML aliases expanded: a shared sub-document
    counts once per reference), computed without expanding; PolicyFolderError above `limit`."""
    memo: dict = {}

    def size(x) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        key = id(x)
        if key not in memo:
            memo[key] = limit + 1  # a cycle (recursive YAML alias) counts as too large
            children = x.values() if isinstance(x, dict) else x
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
            memo[key] = total
        return memo[key]

    total = size(doc)
    if total > limit:
        raise PolicyFolderError(f'{where}: more than {limit} values (YAML aliases expanded): not a policy description')
    return total


# --- sections ------------------------------------------------------------------------------------------------------
def manifest_files(doc: Any, where: str) -> dict:
    """manifest.json -> {relative file name: sha256 hex}."""
    mapping(doc, where, MANIFEST_REQUIRED, MANIFEST_OPTIONAL)
    if 'algorithm' in doc:
        string(doc['algorithm'], f'{where}: algorithm', ('sha256',))
    if 'format_version' in doc:
        integer(doc['format_version'], f'{where}: format_version', 1, 1 << 16)
    files = mapping(doc['files'], f'{where}: files', optional=None)
    for name, digest in files.items():
        file_name(name, f'{where}: files')
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise PolicyFolderError(f'{where}: files[{name!r}] is not a sha256 hex digest: {digest!r:.80}')
    return dict(files)


def policy_document(doc: Any, where: str) -> dict:
    """policy.yaml's top level: a mapping with exactly the known sections."""
    return mapping(doc, where, POLICY_REQUIRED, POLICY_OPTIONAL)


def config(doc: Any, where: str):
    """config -> BlockVLAConfig (its own validate() checks every field's type and range)."""
    from ..model.config import BlockVLAConfig

    mapping(doc, f'{where}: config', optional=None)
    try:
        cfg = BlockVLAConfig.from_dict(doc)
    except (ValueError, TypeError) as e:
        raise PolicyFolderError(f'{where}: config: {e}') from None
    if cfg.backbone_path is not None:
        raise PolicyFolderError(f'{where}: config.backbone_path is {cfg.backbone_path!r}: a policy folder carries '
                                'its weights and the runtime never loads a backbone from elsewhere; re-export '
                                '(blockvla-export writes backbone_path: null)')
    if cfg.vision.get('path') is not None:
        raise PolicyFolderError(f'{where}: config.vision.path is {cfg.vision["path"]!r}: the runtime never loads a '
                                'vision tower from outside the policy folder; re-export (blockvla-export writes the '
                                "tower's config inline)")
    if cfg.vlm_path is not None:  # the same rule for a VLM backbone's folder
        raise PolicyFolderError(f'{where}: config.vlm_path is {cfg.vlm_path!r}: a policy folder carries its weights; '
                                're-export (blockvla-export writes the VLM config inline and vlm_path: null)')
    return cfg


def kv_shape(doc: Any, where: str) -> tuple:
    """(layers, kv_heads, head_dim)."""
    shape = listing(doc, f'{where}: kv_shape', 3)
    return tuple(integer(x, f'{where}: kv_shape[{i}]', 1, 1 << 16) for i, x in enumerate(shape))


def actions(doc: Any, where: str, action_dim: int) -> tuple:
    """actions -> (names, low, high): action_dim names, finite limits within +-MAX_ABS_VALUE, low <= high."""
    w = f'{where}: actions'
    mapping(doc, w, ACTIONS_REQUIRED, ACTIONS_OPTIONAL)
    names = strings(doc['names'], f'{w}.names', action_dim)
    low = numbers(doc['low'], f'{w}.low', action_dim)
    high = numbers(doc['high'], f'{w}.high', action_dim)
    bounds_pair(low, high, f'{w}.low/high')
    if 'limits_source' in doc:
        string(doc['limits_source'], f'{w}.limits_source')
    return names, low, high


def _dim_terms(dim: str):
    """'n + 356', '2*n', 'n + past' -> [(coefficient, symbol or None)], or None when not such a sum."""
    terms = []
    for part in dim.split(' + ') if len(dim) <= 64 else ():
        m = DIM_TERM.match(part)
        if m is None:
            return None
        terms.append((int(m.group(1) or 1), m.group(2)) if m.group(2) else (int(m.group(3)), None))
    symbols = [s for _, s in terms if s]
    return terms if symbols and len(set(symbols)) == len(symbols) and len(terms) <= 3 else None


def dim_symbols(dim: str) -> set:
    """The symbols of a checked symbolic dim: {'n'}, {'n', 'past'}..."""
    return {s for _, s in _dim_terms(dim) or () if s}


def dim_value(dim: str, n: int, past: int | None = None, m: int | None = None) -> int:
    """A symbolic dim ('n', '2*n', 'n + 356', 'n + past', 'm') at token count n, `past` cache slots and m logit
    rows (default: n, every row)."""
    terms = _dim_terms(dim)
    if terms is None:
        raise PolicyFolderError(f'dim {dim!r} is not a sum of a*n, past, m and an integer')
    if past is None and any(s == 'past' for _, s in terms):
        raise PolicyFolderError(f'dim {dim!r} depends on the cache slots a pass reads (past): none given')
    values = {'n': int(n), 'past': None if past is None else int(past), 'm': int(n if m is None else m), None: 1}
    return sum(c * values[s] for c, s in terms)


def tensor(doc: Any, where: str, n_max: int = 1) -> tuple:
    """{name, shape, dtype} -> (name, [dims], dtype); dims are ints or sums of a*n, past and b; bounded element
    count at n = past = n_max."""
    mapping(doc, where, TENSOR_KEYS, ())
    name = string(doc['name'], f'{where}.name', max_len=MAX_NAME_LEN)
    dims = []
    for i, d in enumerate(listing(doc['shape'], f'{where}.shape', max_len=MAX_DIMS)):
        if isinstance(d, str):
            if _dim_terms(d) is None:
                raise PolicyFolderError(f'{where}.shape[{i}]: {d!r} is neither an integer nor a sum of a*n, past, '
                                        'm and an integer')
            dims.append(d)
        else:
            dims.append(integer(d, f'{where}.shape[{i}]', 1, MAX_TENSOR_ELEMENTS))
    at_max = [d if isinstance(d, int) else dim_value(d, n_max, n_max) for d in dims]
    if math.prod(at_max) > MAX_TENSOR_ELEMENTS:
        at = f' at n = {n_max}' if at_max != dims else ''
        raise PolicyFolderError(f'{where}.shape {dims}: {math.prod(at_max)} elements (limit {MAX_TENSOR_ELEMENTS}){at}')
    return name, dims, string(doc['dtype'], f'{where}.dtype', TENSOR_DTYPES)


def graph(key: str, doc: Any, where: str, n_max: int = 1) -> dict:
    """One graph entry -> {'file', 'data', 'inputs', 'outputs'} (tensors as (name, shape, dtype))."""
    w = f'{where}: graphs.{key}'
    mapping(doc, w, GRAPH_REQUIRED, GRAPH_OPTIONAL)
    out = {'file': file_name(doc['file'], f'{w}.file'),
           'data': [file_name(x, f'{w}.data') for x in listing(doc.get('data', []), f'{w}.data', max_len=1)]}
    for side in ('inputs', 'outputs'):
        items = listing(doc[side], f'{w}.{side}', max_len=4096)
        if not items:
            raise PolicyFolderError(f'{w}.{side}: empty')
        out[side] = [tensor(t, f'{w}.{side}[{i}]', n_max) for i, t in enumerate(items)]
        names = [t[0] for t in out[side]]
        if len(set(names)) != len(names):
            raise PolicyFolderError(f'{w}.{side}: duplicate tensor names {names}')
    if key == 'vision' and any(isinstance(d, str) for t in out['inputs'] + out['outputs'] for d in t[1]):
        raise PolicyFolderError(f'{w}: the vision graph has static shapes only')
    return out


def graphs(doc: Any, where: str, cfg) -> dict:
    """graphs (format 2): exactly {vision, backbone}; the backbone's dims vary with n in [1, T_max]."""
    mapping(doc, f'{where}: graphs', GRAPHS, ())
    return {key: graph(key, doc[key], where, cfg.max_seq_len) for key in GRAPHS}


def prefix(doc: Any, where: str, cfg) -> None:
    """prefix (informational, derived from config): must agree with the layout the runtime builds from config."""
    from ..model.prefix_layout import layout_for

    expected = layout_for(cfg).to_dict()
    if doc != expected:
        raise PolicyFolderError(f'{where}: prefix {doc!r:.300} disagrees with config (its layout is {expected}); '
                                're-export the policy')


def precision(doc: Any, where: str) -> str:
    return string(doc, f'{where}: precision', PRECISIONS)


def tokenizer_files(doc: Any, where: str, text_tokenizer: str, reserved: set) -> list:
    """tokenizer_files: the tokenizer's files in this folder (required and non-empty for text_tokenizer 'auto')."""
    names = [file_name(x, f'{where}: tokenizer_files')
             for x in strings(doc, f'{where}: tokenizer_files', max_len=32)]
    clash = sorted(set(names) & reserved)
    if clash:
        raise PolicyFolderError(f'{where}: tokenizer_files names files with another role: {clash}')
    if text_tokenizer == 'auto' and not names:
        raise PolicyFolderError(f"{where}: config.text_tokenizer is 'auto' but tokenizer_files is empty")
    if text_tokenizer != 'auto' and names:
        raise PolicyFolderError(f"{where}: tokenizer_files {names} given but config.text_tokenizer is "
                                f"{text_tokenizer!r} (only 'auto' reads tokenizer files)")
    return names


def weights(doc: Any, where: str, expected: str) -> str | None:
    """weights: null, or the one torch weights file name the exporter writes."""
    if doc is None:
        return None
    return string(doc, f'{where}: weights', (expected,))


def export_info(doc: Any, where: str) -> None:
    """export: provenance (exporter, versions, parity results); a mapping, never read by the runtime."""
    mapping(doc, f'{where}: export', optional=None)


def calibration_row(doc: Any, where: str, cfg) -> dict:
    """One measured decoding setting: a trained block size, 1..B passes, fixed | threshold (tau in (0, 1]), its mean
    NFE, token agreement in [0, 1] and mean bin error."""
    mapping(doc, where, CALIBRATION_ROW, ())
    b = integer(doc['block_size'], f'{where}.block_size', 1, cfg.n_action_tokens)
    if b not in cfg.block_sizes:
        raise PolicyFolderError(f'{where}.block_size: {b} is not one of the trained block sizes {cfg.block_sizes}')
    row = {'block_size': b, 'steps_per_block': integer(doc['steps_per_block'], f'{where}.steps_per_block', 1, b),
           'schedule': string(doc['schedule'], f'{where}.schedule', ('fixed', 'threshold')), 'threshold': None}
    if (row['schedule'] == 'threshold') != (doc['threshold'] is not None):
        raise PolicyFolderError(f'{where}.threshold: {doc["threshold"]!r:.40}; a threshold is given exactly when the '
                                'schedule is threshold')
    if doc['threshold'] is not None:
        row['threshold'] = number(doc['threshold'], f'{where}.threshold', 1.0)
        if row['threshold'] <= 0.0:
            raise PolicyFolderError(f'{where}.threshold: {row["threshold"]} is not in (0, 1]')
    row['nfe'] = number(doc['nfe'], f'{where}.nfe')
    row['agreement'] = number(doc['agreement'], f'{where}.agreement', 1.0)
    row['bin_error'] = number(doc['bin_error'], f'{where}.bin_error', float(cfg.n_bins))
    if row['nfe'] < 1 or row['agreement'] < 0 or row['bin_error'] < 0:
        raise PolicyFolderError(f'{where}: nfe must be >= 1, agreement in [0, 1] and bin_error >= 0 '
                                f'(got {row["nfe"]}, {row["agreement"]}, {row["bin_error"]})')
    return row


def calibration(doc: Any, where: str, cfg) -> dict:
    """calibration (export.calibration): the setting chosen on held-out windows, which must be config's default
    decoding (blockdiff with that block size, passes per block, schedule and threshold) and reach `level`."""
    w = f'{where}: calibration'
    mapping(doc, w, CALIBRATION_REQUIRED, ())
    level = number(doc['level'], f'{w}.level', 1.0)
    if level <= 0.0:
        raise PolicyFolderError(f'{w}.level: {level} is not in (0, 1]')
    out = {'level': level, 'windows': integer(doc['windows'], f'{w}.windows', 1),
           'source': string(doc['source'], f'{w}.source'),
           'reference': calibration_row(doc['reference'], f'{w}.reference', cfg),
           'chosen': calibration_row(doc['chosen'], f'{w}.chosen', cfg),
           'candidates': [calibration_row(r, f'{w}.candidates[{i}]', cfg) for i, r in
                          enumerate(listing(doc['candidates'], f'{w}.candidates', max_len=MAX_CALIBRATION_ROWS))]}
    chosen = out['chosen']
    if chosen['agreement'] < level - 1e-9:
        raise PolicyFolderError(f'{w}.chosen: agreement {chosen["agreement"]} is below the level {level}')
    default = {'block_size': cfg.block_size, 'steps_per_block': cfg.steps_per_block, 'schedule': cfg.schedule,
               'threshold': cfg.threshold if cfg.schedule == 'threshold' else None}
    setting = {k: chosen[k] for k in default}
    if cfg.decoder != 'blockdiff' or setting != default:
        raise PolicyFolderError(f'{w}.chosen {setting} is not config\'s default decoding ({cfg.decoder} {default}): '
                                'the calibrated setting is the default; re-export the policy')
    return out


def stats(doc: Any, where: str, action_dim: int, state_dim: int):
    """stats.json -> NormStats: action_dim (and state_dim) finite bounds within +-MAX_ABS_VALUE, low <= high."""
    from ..model.action_tokenizer import NormStats

    mapping(doc, where, STATS_REQUIRED, STATS_OPTIONAL)
    action_low = numbers(doc['action_low'], f'{where}: action_low', action_dim)
    action_high = numbers(doc['action_high'], f'{where}: action_high', action_dim)
    bounds_pair(action_low, action_high, f'{where}: action_low/action_high')
    state_low = numbers(doc.get('state_low', []), f'{where}: state_low', state_dim)
    state_high = numbers(doc.get('state_high', []), f'{where}: state_high', state_dim)
    bounds_pair(state_low, state_high, f'{where}: state_low/state_high')
    n_samples = integer(doc.get('n_samples', 0), f'{where}: n_samples', 0, 1 << 62)
    return NormStats(action_low=action_low, action_high=action_high, state_low=state_low, state_high=state_high,
                     n_samples=n_samples)
