#!/bin/bash
# issue 15, fifth step: the fast preset with the convolution weight gradients on AMX
# (kernels/conv_weight_grad.cpp) against the same kernels with oneDNN's weight gradient ("onednn_wgrad":
# conv_weight_grad.MIN_IN_CHANNELS set out of reach) and the plain path (--kernels plain), alternating,
# three rounds; then the d2l preset the same way, two rounds. Run alone, from this folder.
PY=../../../.venv/bin/python
export VGGKIT_DATA=${VGGKIT_DATA:-../../../../shared/data} PYTHONPATH=../../../src
bench() {  # bench NAME PRESET KERNELS OFF
  local pre=""
  [ "$4" = off ] && pre="import vggkit.kernels.conv_weight_grad as c; c.MIN_IN_CHANNELS = 10**9"
  $PY -c "$pre
import sys; from vggkit.cli import main
sys.exit(main(['bench', '--preset', '$2', '--runs', '3', '--no-peak', '--kernels', '$3', '--json']))" > $1.json 2> $1.err
}
for round in 1 2 3; do
  bench plain_fast_$round fast plain on
  bench onednn_wgrad_fast_$round fast fast off
  bench amx_wgrad_fast_$round fast fast on
done
for round in 1 2; do
  bench plain_d2l_$round d2l plain on
  bench onednn_wgrad_d2l_$round d2l fast off
  bench amx_wgrad_d2l_$round d2l fast on
done
echo done
