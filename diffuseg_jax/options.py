"""Comma-separated option lists of a config (`config.stages`, `config.segmentation.strategies`)."""

from __future__ import annotations

import difflib

from diffuseg_jax.errors import ConfigError


def parse_names(value: str, choices: tuple[str, ...], field: str) -> list[str]:
  """The names in `value` ('a,b'), in the order given; a name not in `choices` is a one-line ConfigError
  naming `config.<field>` and the closest choice."""
  names = [s.strip() for s in str(value).split(',') if s.strip()]
  unknown = [s for s in names if s not in choices]
  if unknown or not names:
    hint = ''.join(f' (did you mean {m[0]!r}?)' for u in unknown if (m := difflib.get_close_matches(u, choices, 1)))
    raise ConfigError(f'config.{field}={value!r}: unknown {unknown}{hint}; choose from {",".join(choices)}')
  return names


def strategy_subset(value, choices: tuple[str, ...], field: str) -> frozenset[str]:
  """A set of strategies given as 'a,b', 'all' (every one of `choices`) or '' / 'none' (empty); an unknown name
  is a one-line ConfigError."""
  text = str(value).strip()
  if text in ('', 'none'):
    return frozenset()
  if text == 'all':
    return frozenset(choices)
  return frozenset(parse_names(text, choices, field))
