#!/bin/bash
# issue 15, fourth step: today's plain path (--kernels plain: the network and optimizer step as before
# issue 15) against the default --kernels fast (now with the fused first-layer conv + ReLU + pool and
# the fused batch norm + pool + ReLU, and now the classifier weights stepped through bf16 copies, the
# 16-bit dropout draws and the 512-bit first-layer kernel), alternating, two rounds; then the peak probes and the textbook
# loop once per preset. Run alone, from this folder.
A=../../../.venv/bin/vggkit
export VGGKIT_DATA=${VGGKIT_DATA:-../../../../shared/data}
for round in 1 2; do
  for preset in fast d2l; do
    $A bench --preset $preset --runs 3 --no-peak --kernels plain --json > plain_${preset}_$round.json 2>plain_${preset}_$round.err
    $A bench --preset $preset --runs 3 --no-peak --kernels fast --json > fast_${preset}_$round.json 2>fast_${preset}_$round.err
  done
done
for preset in d2l fast; do
  $A bench --preset $preset --runs 3 --compare --json > compare_${preset}.json 2>compare_${preset}.err
done
echo done
