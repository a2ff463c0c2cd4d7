"""The reference packages that the parity tests compare against.

They come with the test extra, which the suite requires (`pip install -e '.[test]'`, as .ci/run
does). So a missing one is an error that names it and that command, never a skipped parity test:
in CI a skip would hide that the comparison never ran. tests/test_requirements.py checks that every
package the tests import is declared and that no test skips on a missing import.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = "pip install -e '.[test]' && pip install --no-deps -r requirements-test-no-deps.txt"
# import name -> distribution (pip) name, where the two differ
DISTRIBUTIONS = {"dall_e": "dall-e", "open_clip": "open_clip_torch", "PIL": "pillow", "open_flamingo": "open-flamingo"}


def require(module: str) -> ModuleType:
    """Imports `module` (e.g. "timm.data.auto_augment"); if that fails, raises an ImportError that
    names the package and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        dist = DISTRIBUTIONS.get(top, top)
        raise ImportError(f"the tests need the reference package {dist!r} (import {module!r}), part of "
                          f"the test extra that the suite requires: run `{INSTALL}`. ({e})") from e
