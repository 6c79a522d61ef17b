"""Parameter trees: the one `PyTree` alias and the flat-dict view every module uses.

Flax keeps parameters as nested dicts (`{'layers_0': {'attention': {'q_proj': {'kernel': ...}}}}`);
renaming, masking and counting are easier on the flat view `{('layers_0', 'attention', 'q_proj',
'kernel'): array}`.
"""

from typing import Any

import flax

PyTree = Any
Path = tuple[str, ...]


def flatten(tree: PyTree) -> dict[Path, Any]:
  """{path tuple: leaf} of a (possibly frozen) nested dict."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def unflatten(flat: dict[Path, Any]) -> PyTree:
  """The nested dict of a `flatten` view."""
  return flax.traverse_util.unflatten_dict(flat)
