#!/usr/bin/env bash
# Issue 17: each named bug has a test that fails on the old code. This applies
# scripts/reverted_fixes.patch (the 0.1 code of the binary AUC, the name-only cell grouping and
# `results --failed`) to a temporary worktree of HEAD, runs the three bug tests there and expects
# them to fail; then runs them on HEAD and expects them to pass.
# Usage: bash scripts/check_bug_tests.sh   (from the repository root, after `make setup-dev`)
set -euo pipefail
root=$(pwd)
tests=(tests/test_metrics.py::test_binary_auc_scores_the_positive_class_in_either_class_order
       tests/test_evidence.py::test_two_image_sizes_of_one_backbone_are_two_rows
       tests/test_cli.py::test_results_failed_lists_each_failed_cell_with_its_labels_and_first_error_line)
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/wt" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/wt" HEAD
git -C "$tmp/wt" apply "$root/scripts/reverted_fixes.patch"
echo "== with the fixes reverted (expected: these fail)"
if (cd "$tmp/wt" && PYTHONPATH=src "$root/.venv/bin/python" -m pytest -p no:randomly -p no:cacheprovider "${tests[@]}" --no-header --tb=line -rf); then
  echo "the bug tests PASSED on the reverted code: they do not catch the bugs"; exit 1
fi
echo "== on HEAD (expected: these pass)"
PYTHONPATH=src "$root/.venv/bin/python" -m pytest -p no:randomly "${tests[@]}" --no-header
echo "ok: every bug test fails with its fix reverted and passes with it"
