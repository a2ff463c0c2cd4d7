"""The suite requires the test extra (`pip install -e '.[test]'`, as .ci/run installs it), so:
every package the tests import is declared in setup.cfg (install_requires or the `test` extra) or
in requirements-test-no-deps.txt (references installed without their pinned dependencies),
and no test skips when an import fails: a missing reference must fail the run, not quietly skip
the parity test that needs it (tests/references.py raises a clear error instead)."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

from references import DISTRIBUTIONS, INSTALL

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tests import the benchmark scripts (tests/benchmarks), so their imports count too.
SOURCES = sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py")])
LOCAL = {"mmjax", "benchmarks", "tests", *(p.stem for p in SOURCES)}   # e.g. gcs_emulator, references


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
    no_deps = (ROOT / "requirements-test-no-deps.txt").read_text().splitlines()   # installed with --no-deps
    lines += [line for line in no_deps if not line.lstrip().startswith("#")]
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", line.strip()).group()) for line in lines if line.strip()}


def _imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of everything imported: import statements (also inside functions) and
    string arguments of require(...) / import_module(...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and _callee(node) in ("require", "import_module", "importorskip")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {name.partition(".")[0] for name in names}


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_every_imported_package_is_declared():
    declared, installed = _declared(), importlib.metadata.packages_distributions()
    problems = []
    for path in SOURCES:
        for module in sorted(_imported_modules(ast.parse(path.read_text(), str(path)))):
            if module in sys.stdlib_module_names or module in LOCAL:
                continue
            dists = installed.get(module) or [DISTRIBUTIONS.get(module, module)]
            if not any(_normalize(d) in declared for d in dists):
                where = "" if module in installed else " (and it is not installed)"
                problems.append(f"{path.relative_to(ROOT)} imports {module!r}: declare {dists[0]!r} in setup.cfg's "
                                f"install_requires or its `test` extra{where}")
    assert not problems, "\n".join(problems)


def _skips_on_missing_import(tree: ast.AST) -> list[int]:
    """Lines where a test would skip instead of failing when an import fails."""
    def calls_skip(nodes):
        return any(isinstance(n, ast.Call) and _callee(n) in ("skip", "skipif", "xfail")
                   for node in nodes for n in ast.walk(node))

    def about_imports(node) -> bool:
        return bool(re.search(r"ImportError|ModuleNotFoundError|find_spec|importlib", ast.unparse(node)))

    def skips(node) -> bool:
        if isinstance(node, ast.Call):   # importorskip(...), skipif(find_spec(...) is None, ...)
            return _callee(node) == "importorskip" or (
                _callee(node) in ("skipif", "xfail") and any(map(about_imports, [*node.args, *node.keywords])))
        if isinstance(node, ast.ExceptHandler):   # except ImportError: skip(...)
            return node.type is not None and about_imports(node.type) and calls_skip(node.body)
        if isinstance(node, ast.If):   # if find_spec(...) is None: skip(...)
            return about_imports(node.test) and calls_skip(node.body)
        return False

    return sorted(node.lineno for node in ast.walk(tree) if skips(node))


def test_no_test_skips_on_a_missing_import():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in SOURCES
             for line in _skips_on_missing_import(ast.parse(path.read_text(), str(path)))]
    assert not found, (f"skips on a missing import at {found}: the suite requires `{INSTALL}`, so import "
                       "the package (tests/references.py `require` names the install command) instead")


def test_the_checks_see_skips_and_imports():
    """The two checks above would notice the patterns they forbid."""
    source = '''
import pytest
import numpy, some_undeclared_pkg.sub
x = pytest.importorskip("dall_e")
try:
    import timm
except ImportError:
    pytest.skip("no timm")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("no open_clip")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="no torch")
def test(): require("cloudpickle")
'''
    tree = ast.parse(source)
    assert _skips_on_missing_import(tree) == [4, 7, 9, 11]
    assert _imported_modules(tree) == {"pytest", "numpy", "some_undeclared_pkg", "dall_e", "timm", "cloudpickle"}
    assert "some-undeclared-pkg" not in _declared() and {"dall-e", "cloudpickle", "pytest"} <= _declared()
