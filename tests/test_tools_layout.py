"""The shape of tools/: command lines over a library, no sys.path edits.

Read from the source (ast), nothing imported: no file in tools/ imports a
command line (a module that runs as `__main__`: tools/X.py and the
command lines of tools/benchmarks, tools/scenes and tools/study; they
import libraries), imports run one way between the packages (tools.lib
below tools.scenes below tools.study; nothing imports tools.study), there
is no import circle, and no file edits `sys.path` except the EventGPT
plugin, which adds the user's own EventGPT checkout.
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


# Packages of tools/ by layer: a module imports its own layer or lower ones.
LAYERS = {
  "tools.lib": 0,
  "tools.plugins": 1,
  "tools.scenes": 1,
  "tools.benchmarks": 2,
  "tools.study": 2,
}
TOP = 3  # tools/X.py, the command lines of the torch side


def _module(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3]
  return rel.replace(os.sep, ".").removesuffix(".__init__")


def _layer(module: str) -> int:
  for package, layer in LAYERS.items():
    if module == package or module.startswith(package + "."):
      return layer
  return TOP


def _scripts() -> set[str]:
  """Module names of the command lines: every tools module run as
  `__main__` (a module the command lines share has no such block)."""
  names = set()
  for path in _py_files(TOOLS):
    with open(path) as f:
      if "__main__" in f.read():
        names.add(_module(path))
  return names


def _tools_imports() -> dict[str, set[str]]:
  """tools module -> the tools modules it imports (anywhere in the file)."""
  known = {_module(p) for p in _py_files(TOOLS)}
  graph = {}
  for path in _py_files(TOOLS):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    graph[_module(path)] = _imported_modules(tree) & known
  return graph


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


def _script_imports() -> list[str]:
  scripts = _scripts()
  bad = []
  for path in _py_files(TOOLS):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, REPO)
    for name in sorted(_imported_modules(tree) & scripts):
      if _module(path) != name:
        bad.append(f"{rel} imports {name}")
  return bad


def test_scripts_never_import_scripts():
  scripts = _scripts()
  for name in (
    "tools.benchmark_sd",
    "tools.scenes.make_pair",
    "tools.scenes.samples",
    "tools.study.__main__",
  ):
    assert name in scripts, name
  bad = _script_imports()
  assert not bad, sorted(bad)


def test_imports_never_climb_a_layer():
  bad = [
    f"{mod} imports {dep}"
    for mod, deps in _tools_imports().items()
    for dep in sorted(deps)
    if _layer(dep) > _layer(mod) and not mod.startswith("tools.plugins")
  ]
  assert not bad, bad
  # tools.scenes does not know the study; the study's pair interface is
  # implemented by name (tools/scenes/study_pair.py).
  graph = _tools_imports()
  assert "tools.scenes.study_pair" in graph["tools.study.cli"]


def test_no_import_circle():
  graph = _tools_imports()
  state = {}

  def visit(mod, path):
    state[mod] = "open"
    for dep in sorted(graph.get(mod, ())):
      if dep == mod or _package(dep) == mod:
        continue
      if state.get(dep) == "open":
        raise AssertionError(" -> ".join(path + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[mod] = "done"

  for mod in sorted(graph):
    if mod not in state:
      visit(mod, [mod])


def _package(module: str) -> str:
  return module.rsplit(".", 1)[0]


def test_no_sys_path_edits():
  bad = []
  for path in _py_files(TOOLS):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, REPO)
    if _edits_sys_path(tree) and rel not in SYS_PATH_ALLOWED:
      bad.append(rel)
  assert not bad, f"sys.path edited in {bad}"
