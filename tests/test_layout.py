"""The package's imports run one way: no module imports one that imports it
back (directly or through others), counting imports inside functions too."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "egpt_align"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from pkg import sub` imports the submodule when there is one.
        targets = [
          f"{node.module}.{a.name}"
          if f"{node.module}.{a.name}" in modules
          else node.module
          for a in node.names
        ]
      else:
        continue
      edges |= {t for t in targets if t in modules and t != name}
    graph[name] = edges
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycles():
  graph = _import_graph()
  assert len(graph) > 20  # the walk covered the package
  assert "egpt_align.train_state" in graph["egpt_align.train"]
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_evaluation_does_not_import_the_trainer():
  graph = _import_graph()
  assert "egpt_align.train" not in graph["egpt_align.evaluate"]
  assert "egpt_align.evaluate" not in graph["egpt_align.report"]
