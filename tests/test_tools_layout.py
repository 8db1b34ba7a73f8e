"""The shape of tools/: command lines over a library, no sys.path edits.

Read from the source (ast), nothing imported: no file in tools/ imports a
command line (tools/X.py; they import `tools.lib` and `egpt_align`), and no
file edits `sys.path` except the EventGPT plugin, which adds the user's own
EventGPT checkout.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
# The one sys.path edit: the user's EventGPT checkout root.
SYS_PATH_ALLOWED = {os.path.join("tools", "plugins", "eventgpt.py")}


def _py_files(root):
  for dirpath, _, names in os.walk(root):
    for name in sorted(names):
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def _scripts() -> set[str]:
  """Module names of the command lines: tools.X and tools.benchmarks.X."""
  names = set()
  for package in ("tools", os.path.join("tools", "benchmarks")):
    for name in os.listdir(os.path.join(REPO, package)):
      path = os.path.join(REPO, package, name)
      if not name.endswith(".py") or name == "__init__.py":
        continue
      with open(path) as f:
        if "__main__" not in f.read():
          continue  # A module the command lines share, not one of them.
      names.add(f"{package.replace(os.sep, '.')}.{name[:-3]}")
  return names


def _imported_modules(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _edits_sys_path(tree: ast.AST) -> bool:
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr == "path"
      and isinstance(node.value, ast.Name)
      and node.value.id == "sys"
    ):
      return True
  return False


def test_scripts_never_import_scripts():
  scripts = _scripts()
  assert "tools.benchmark_sd" in scripts
  bad = []
  for path in _py_files(TOOLS):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, REPO)
    for name in sorted(_imported_modules(tree) & scripts):
      if rel[:-3].replace(os.sep, ".") != name:
        bad.append(f"{rel} imports {name}")
  assert not bad, bad


def test_no_sys_path_edits():
  bad = []
  for path in _py_files(TOOLS):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, REPO)
    if _edits_sys_path(tree) and rel not in SYS_PATH_ALLOWED:
      bad.append(rel)
  assert not bad, f"sys.path edited in {bad}"
