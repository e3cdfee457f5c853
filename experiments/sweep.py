"""Sweeps declared beside the config they sweep.

A config file may define, next to `get_config(arg)`, a function returning the sweep's points, each
a dict of dotted config overrides (big_vision keeps sweeps beside configs in the same spirit):

    from experiments import sweep

    def get_sweep(arg=None):
      return sweep.product(
          sweep.axis('model.ds.mode', ['none', 'deep']),
          sweep.axis('seed', [0, 1, 2]),
      )

Building blocks: `axis` (one key, several values), `product` (every combination, the first
factor varying slowest), `zip_axes` (element-wise), `chain` (one sweep after another).

Point names (`point_names`) are deterministic and filesystem-safe, so a launcher can find the
workdir of a point again after an interruption:
  * `key=value` pairs joined by `,` in the point's key order, e.g. `mode=deep,seed=1`;
  * a key is shown by its last dotted component, unless two keys of the sweep share it, then
    by the shortest dotted suffix that tells them apart (`model.ds.mode` vs `loss.mode` ->
    `ds.mode`, `loss.mode`);
  * values: numbers as Python writes them (`0.001`, `1e-05`), strings as they are, booleans
    `True`/`False`, tuples and lists joined by `_` (`0.5_0.25_0`), `None` as `None`;
  * characters outside `[A-Za-z0-9._+=,-]` become `_`; a leading `.` or `-` gets a `_` in front;
    the empty point is named `default`;
  * a name longer than `max_len` is cut and ends with `+` and 8 hex digits of a hash of the point;
  * points that still end up with the same name (e.g. the values `1` and `'1'`, or `a/b` and
    `a_b`) all get `+<hash>` appended, the hash of the point's exact values and types.
Names of existing points do not change when values are added to an axis; they can change when a
new key that shares a last component with another key is added.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import itertools
import pathlib
import re
import types
from typing import Any, Iterable, Mapping, Sequence

from ml_collections import config_dict

from unet_ds import dirnames

Point = dict[str, Any]

_KEY_PATTERN = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
_DEFAULT_MAX_LEN = 100
_HASH_LEN = 8


# ----------------------------------------------------------------------------------------------
# Building sweeps.


def axis(key: str, values: Iterable[Any]) -> list[Point]:
  """One point per value: `axis('seed', [0, 1])` -> `[{'seed': 0}, {'seed': 1}]`.

  Lists inside values become tuples (ConfigDict fields hold tuples, and the command line parses
  `(a, b)` back into one).
  """
  if not isinstance(key, str) or not _KEY_PATTERN.match(key):
    raise ValueError(f'sweep axis key {key!r} is not a dotted config key like "model.ds.mode"')
  if isinstance(values, (str, bytes)):
    raise TypeError(f'sweep axis {key!r}: values must be a sequence of values, got the string '
                    f'{values!r}; write [{values!r}] for a single value')
  values = [_normalise_value(v) for v in values]
  if not values:
    raise ValueError(f'sweep axis {key!r} has no values')
  return [{key: v} for v in values]


def product(*sweeps: Sequence[Point]) -> list[Point]:
  """Every combination of the sweeps' points; the first sweep varies slowest."""
  points = [{}]
  for sweep in sweeps:
    points = [_merge(a, b, 'product') for a in points for b in sweep]
  return points


def zip_axes(*sweeps: Sequence[Point]) -> list[Point]:
  """Points merged element-wise: the sweeps must have the same length."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f'zip_axes needs sweeps of one length, got lengths {[len(s) for s in sweeps]}')
  return [_merge_all(group, 'zip_axes') for group in zip(*sweeps)]


def chain(*sweeps: Sequence[Point]) -> list[Point]:
  """The sweeps' points one after another (e.g. a baseline plus a product of variants)."""
  return [dict(p) for p in itertools.chain.from_iterable(sweeps)]


def _merge(a: Point, b: Point, where: str) -> Point:
  for key in a.keys() & b.keys():
    if a[key] != b[key]:
      raise ValueError(f'{where}: key {key!r} is set twice in one point ({a[key]!r} and {b[key]!r})')
  return {**a, **b}


def _merge_all(points: Iterable[Point], where: str) -> Point:
  out = {}
  for p in points:
    out = _merge(out, p, where)
  return out


def _normalise_value(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_normalise_value(v) for v in value)
  return value


# ----------------------------------------------------------------------------------------------
# Names.


def point_names(points: Sequence[Mapping[str, Any]], max_len: int = _DEFAULT_MAX_LEN) -> list[str]:
  """Unique, deterministic, filesystem-safe names for the points (rules in the module doc)."""
  if max_len < 2 * _HASH_LEN:
    raise ValueError(f'max_len must be at least {2 * _HASH_LEN}, got {max_len}')
  fingerprints = [_fingerprint(p) for p in points]
  seen = {}
  for i, fp in enumerate(fingerprints):
    if fp in seen:
      raise ValueError(f'sweep points {seen[fp]} and {i} are the same point: {dict(points[i])!r}')
    seen[fp] = i

  short = _short_keys({k for p in points for k in p})
  names = []
  for point, fp in zip(points, fingerprints):
    name = ','.join(f'{short[k]}={format_value(v)}' for k, v in point.items()) or 'default'
    name = dirnames.safe_name(name)
    if len(name) > max_len:
      name = name[:max_len - _HASH_LEN - 1] + '+' + _hash(fp)
    names.append(name)

  counts = {}
  for name in names:
    counts[name] = counts.get(name, 0) + 1
  return [
      n + '+' + _hash(fp) if counts[n] > 1 else n for n, fp in zip(names, fingerprints)
  ]


def format_value(value: Any) -> str:
  """A value as it appears in a point name (before unsafe characters are replaced)."""
  if isinstance(value, (tuple, list)):
    return '_'.join(format_value(v) for v in value) if value else 'empty'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _short_keys(keys: set[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key of the sweep ends with."""
  short = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith('.' + suffix))
                 for other in keys):
        break
    short[key] = suffix
  return short


def _fingerprint(point: Mapping[str, Any]) -> str:
  # repr keeps types apart (1, 1.0, '1', True) and is stable across runs.
  return repr(sorted(point.items()))


def _hash(fingerprint: str) -> str:
  return hashlib.sha1(fingerprint.encode()).hexdigest()[:_HASH_LEN]


# ----------------------------------------------------------------------------------------------
# Config files.


def split_config_arg(config_arg: str) -> tuple[pathlib.Path, str | None]:
  """`'configs/x.py:a=1,smoke'` -> `(Path('configs/x.py'), 'a=1,smoke')`; no `:` -> arg None."""
  path, sep, arg = config_arg.partition(':')
  return pathlib.Path(path), (arg if sep else None)


def load_config_module(path: pathlib.Path) -> types.ModuleType:
  """Imports a config file by path (like ml_collections' config flags do)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config file {path} does not exist')
  name = '_experiments_config_' + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path} defines no get_config(arg)')
  return module


def load(config_arg: str) -> tuple[config_dict.ConfigDict, list[Point]]:
  """The config and the sweep points of `FILE.py[:ARG]`; every point checked against the config."""
  path, arg = split_config_arg(config_arg)
  module = load_config_module(path)
  config = module.get_config(arg)
  get_sweep = getattr(module, 'get_sweep', None)
  if not callable(get_sweep):
    raise ValueError(f'config file {path} defines no get_sweep(arg): nothing to sweep (run '
                     f'`python -m unet_ds.main --config={config_arg}` for a single run)')
  points = [dict(p) for p in get_sweep(arg)]
  if not points:
    raise ValueError(f'{path}: get_sweep({arg!r}) returned no points')
  for i, point in enumerate(points):
    try:
      apply_overrides(config, point)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{path}: sweep point {i} {point!r}: {e}') from None
  return config, points


def apply_overrides(config: config_dict.ConfigDict,
                    overrides: Mapping[str, Any]) -> config_dict.ConfigDict:
  """A copy of `config` with the dotted overrides set; unknown keys and wrong types raise."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    node, leaf = _parent(config, key)
    if isinstance(node[leaf], config_dict.ConfigDict):
      raise TypeError(f'key {key!r} is a config group, not a value')
    try:
      node[leaf] = _normalise_value(value)
    except TypeError as e:
      raise TypeError(f'key {key!r}: {e}') from None
  return config


def get_value(config: config_dict.ConfigDict, key: str) -> Any:
  """The value at a dotted key; an unknown key raises KeyError with close matches."""
  node, leaf = _parent(config, key)
  return node[leaf]


def _parent(config: config_dict.ConfigDict, key: str) -> tuple[config_dict.ConfigDict, str]:
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      raise KeyError(_unknown_key_message(config, '.'.join(parents[:i + 1]), key))
    node = node[part]
  if not isinstance(node, config_dict.ConfigDict) or leaf not in node:
    raise KeyError(_unknown_key_message(config, key, key))
  return node, leaf


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dicts/ConfigDicts -> `{'a.b.c': value}`; lists become tuples."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (Mapping, config_dict.ConfigDict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = _normalise_value(value)
  return out


def _unknown_key_message(config: config_dict.ConfigDict, missing: str, key: str) -> str:
  known = list(flatten(config.to_dict()))
  close = difflib.get_close_matches(key, known, n=3)
  hint = f'; did you mean {", ".join(close)}?' if close else ''
  return f'config has no key {missing!r} (overriding {key!r}){hint}'
