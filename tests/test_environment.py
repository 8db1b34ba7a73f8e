"""The provenance every results file records (tools/lib/environment.py)."""

import subprocess

from tools.lib.environment import git_commit


def _git(repo, *args):
  return subprocess.run(
    ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
    cwd=repo,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()


def test_git_commit_marks_a_checkout_that_differs_from_head(tmp_path):
  assert git_commit(str(tmp_path)) is None  # not a checkout
  _git(tmp_path, "init", "-q")
  (tmp_path / "code.py").write_text("a = 1\n")
  _git(tmp_path, "add", "code.py")
  _git(tmp_path, "commit", "-q", "-m", "one")
  head = _git(tmp_path, "rev-parse", "HEAD")
  assert git_commit(str(tmp_path)) == head
  # An untracked file is not code that ran from the commit's tree.
  (tmp_path / "notes.txt").write_text("x\n")
  assert git_commit(str(tmp_path)) == head
  # A tracked file changed (as in a copy of a working tree carried with a
  # stale .git): the commit alone would name code that did not run.
  (tmp_path / "code.py").write_text("a = 2\n")
  assert git_commit(str(tmp_path)) == head + "+dirty"
  _git(tmp_path, "add", "code.py")  # staged, still not committed
  assert git_commit(str(tmp_path)) == head + "+dirty"
