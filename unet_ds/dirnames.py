"""Run directory names made from settings: one rule for sweep points and multi-run members, and
the file that lists a multi-run workdir's members."""

from __future__ import annotations

import json
import os
import re

# In a multi-run workdir: the member runs' names (each member is a run folder beside it).
MULTIRUN_FILE = 'multirun.json'

# Kept in names: letters, digits and the separators of `key=value,key=value` lists.
UNSAFE_CHARS = re.compile(r'[^A-Za-z0-9._+=,-]')


def safe_name(text: str) -> str:
  """`text` as one path component: characters outside `[A-Za-z0-9._+=,-]` become `_`, and a
  leading `.` or `-` (a hidden file, a command-line flag) gets a `_` in front."""
  name = UNSAFE_CHARS.sub('_', text)
  if name[:1] in ('.', '-'):
    name = '_' + name
  return name


def multirun_members(workdir: str) -> list[str] | None:
  """The member run names that a multi-run workdir's `MULTIRUN_FILE` lists; None when `workdir`
  has none (a single run's folder, or not a run)."""
  path = os.path.join(workdir, MULTIRUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return list(json.load(f).get('runs', []))
