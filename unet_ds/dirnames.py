"""Run directory names made from settings: one rule for sweep points and multi-run members."""

from __future__ import annotations

import re

# Kept in names: letters, digits and the separators of `key=value,key=value` lists.
UNSAFE_CHARS = re.compile(r'[^A-Za-z0-9._+=,-]')


def safe_name(text: str) -> str:
  """`text` as one path component: characters outside `[A-Za-z0-9._+=,-]` become `_`, and a
  leading `.` or `-` (a hidden file, a command-line flag) gets a `_` in front."""
  name = UNSAFE_CHARS.sub('_', text)
  if name[:1] in ('.', '-'):
    name = '_' + name
  return name
