#!/bin/bash
# issue 15, second step: the session's starting code (988f4d9, its default "fast kernels" of the
# first step), today's plain path (--kernels plain: the network and optimizer step as before issue
# 15) and the new default, alternating, in one session. Run alone, from this folder.
START=${START:?a checkout of 988f4d9}
B="env PYTHONPATH=$START/src ../../../.venv/bin/python -m vggkit"   # the session's starting code
A=../../../.venv/bin/vggkit                                         # this checkout
export VGGKIT_DATA=${VGGKIT_DATA:-../../../../shared/data}
for round in 1 2; do
  for preset in fast d2l; do
    $B bench --preset $preset --runs 3 --no-peak --json > start_${preset}_$round.json 2>start_${preset}_$round.err
    $A bench --preset $preset --runs 3 --no-peak --kernels plain --json > plain_${preset}_$round.json 2>plain_${preset}_$round.err
    $A bench --preset $preset --runs 3 --no-peak --kernels fast --json > fast_${preset}_$round.json 2>fast_${preset}_$round.err
  done
done
# the peak probes and the textbook loop, once per preset, new default
for preset in d2l fast; do
  $A bench --preset $preset --runs 3 --compare --json > compare_${preset}.json 2>compare_${preset}.err
done
echo done
