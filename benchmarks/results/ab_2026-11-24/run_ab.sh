#!/bin/bash
# issue 11 (restructure: before vs after, today's plain path) and issue 15 (fast kernels) in one session, alternating
B=${BEFORE:?a checkout of 7d4d4fe with its own .venv}/.venv/bin/vggkit   # the code before the restructure
A=.venv/bin/vggkit                                                      # this checkout
export VGGKIT_DATA=${VGGKIT_DATA:-../shared/data}
for round in 1 2; do
  for preset in fast d2l; do
    $B bench --preset $preset --runs 3 --no-peak --json > before_${preset}_$round.json 2>before_${preset}_$round.err
    $A bench --preset $preset --runs 3 --no-peak --kernels plain --json > plain_${preset}_$round.json 2>plain_${preset}_$round.err
    $A bench --preset $preset --runs 3 --no-peak --kernels fast --json > fast_${preset}_$round.json 2>fast_${preset}_$round.err
  done
done
echo done
