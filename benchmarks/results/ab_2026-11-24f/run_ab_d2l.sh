#!/bin/bash
# issue 15, sixth step: d2l inference with the pool kernel's and the first layer's forward (this
# commit's src) against the commit before it (a worktree of it at $PREV, default /work/ab_prev),
# alternating, two rounds; training is the same code in both. Run alone, from this folder.
PY=../../../.venv/bin/python
export VGGKIT_DATA=${VGGKIT_DATA:-../../../../shared/data}
PREV=${PREV:-/work/ab_prev}
bench() {  # bench NAME SRC
  PYTHONPATH=$2 $PY -m vggkit bench --preset d2l --runs 3 --no-peak --json > $1.json 2> $1.err
}
for round in 1 2; do
  bench d2l_before_$round $PREV/src
  bench d2l_after_$round ../../../src
done
echo done
